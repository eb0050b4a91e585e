"""``evotune train CONFIG``: load the config, set up the processes, train.

Single process by default. Multi-process launch (torchrun re-launch from
``NPROC_PER_NODE``, slurm) is handled in :mod:`evotune.parallel.launch`.
"""

from __future__ import annotations

import argparse
import os

from evotune.config import load_config
from evotune.errors import EvotuneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file, or the name of a shipped config (see list-cfg)")
    parser.add_argument("--work-dir", help="output folder (default ./work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override settings, e.g. max_length=4096 train_dataloader.num_workers=2")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's randomness.seed or 0)")
    parser.add_argument("--deepspeed", help="ZeRO preset (deepspeed_zero1/2/3[_offload]) or a DeepSpeed JSON")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def resolve_config_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    from evotune.configs import config_path

    found = config_path(name)
    if found is None:
        raise EvotuneError(f"config '{name}' is neither a file nor a shipped config (see `evotune list-cfg`)")
    return found


def main(args: argparse.Namespace) -> int:
    from evotune.parallel.env import setup, teardown
    from evotune.train.loop import train

    path = resolve_config_path(args.config)
    cfg = load_config(path, args.cfg_options)
    name = os.path.splitext(os.path.basename(path))[0]
    work_dir = args.work_dir or cfg.get("work_dir") or os.path.join("work_dirs", name)
    env = setup(args.device)
    try:
        summary = train(cfg, work_dir, env, seed=args.seed)
    finally:
        teardown()
    if env.is_main:
        print(f"evotune: done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")
        print(f"evotune: Hugging Face model in {summary['hf_dir']}")
        print(f"evotune: metrics in {summary['metrics']}")
    return 0
