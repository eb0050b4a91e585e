"""``evotune train CONFIG``: launch the processes, load the config, train.

One process by default. ``NPROC_PER_NODE=N`` (with ``NNODES``, ``NODE_RANK``,
``ADDR``, ``PORT`` for several nodes) re-launches this command under torchrun;
``--launcher slurm`` reads the slurm environment of an ``srun`` task;
``--launcher pytorch`` trusts an external launcher's variables
(:mod:`evotune.parallel.launch`). ``--deepspeed`` picks the ZeRO preset that
FSDP2 realises (:mod:`evotune.parallel.zero`, :mod:`evotune.parallel.fsdp`);
``--resume auto|PATH`` continues from a checkpoint (:mod:`evotune.checkpoint.dcp`).
"""

from __future__ import annotations

import argparse
import os
import sys

from evotune.configs import config_path
from evotune.errors import EvotuneError
from evotune.parallel.launch import LAUNCHERS, relaunch, torchrun_command
from evotune.parallel.zero import read_deepspeed
from evotune.settings import load_settings
from evotune.train import preempt
from evotune.train.preempt import Preempted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file, or the name of a shipped config (see list-cfg)")
    parser.add_argument("--work-dir", help="output folder (default ./work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override settings, e.g. max_length=4096 train_dataloader.num_workers=2")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's randomness.seed or 0)")
    parser.add_argument("--deepspeed", help="ZeRO preset (deepspeed_zero1/2/3[_offload]) or a DeepSpeed JSON, "
                                            "realised with FSDP2 (default with several processes: plain data "
                                            "parallel)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--launcher", choices=(*LAUNCHERS, "mpi"), default="none",
                        help="how the processes were started: none (one process, or NPROC_PER_NODE=N to "
                             "re-launch under torchrun), pytorch (torchrun or another launcher set RANK, "
                             "WORLD_SIZE, ...), slurm (srun); XTuner's mpi is refused")
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None,
                        help="XTuner's flag (torch.distributed.launch passes it): sets LOCAL_RANK when the "
                             "launcher did not")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the latest checkpoint of the work dir (auto) or from PATH")
    parser.add_argument("--resume-data-changed", choices=["ok"],
                        help="ok: resume although the training data changed since the checkpoint (refused "
                             "otherwise; the data order then continues on the new data)")


def resolve_config_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    found = config_path(name)
    if found is None:
        raise EvotuneError(f"config '{name}' is neither a file nor a shipped config (see `evotune list-cfg`)")
    return found


def train_argv(args: argparse.Namespace) -> list[str]:
    """The arguments of this ``evotune train`` call, for the processes torchrun starts."""
    argv = [args.config]
    for flag, value in (("--work-dir", args.work_dir), ("--seed", args.seed), ("--deepspeed", args.deepspeed),
                        ("--device", args.device), ("--resume", args.resume),
                        ("--resume-data-changed", args.resume_data_changed)):
        if value is not None:
            argv += [flag, str(value)]
    if args.cfg_options:
        argv += ["--cfg-options", *args.cfg_options]
    return argv


def settings_of(args: argparse.Namespace, zero):
    """The settings of this command line: the config, ``--cfg-options`` and the flags that set values."""
    return load_settings(resolve_config_path(args.config), args.cfg_options, seed=args.seed,
                         work_dir=args.work_dir, resume=args.resume, deepspeed=zero,
                         resume_data_changed=True if args.resume_data_changed else None)


def main(args: argparse.Namespace) -> int:
    if args.launcher == "mpi":
        raise EvotuneError("--launcher mpi: evotune starts its processes with torchrun (NPROC_PER_NODE=N) or srun "
                           "(--launcher slurm), or joins an external launcher's (--launcher pytorch)")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # as XTuner's tools/train.py does
    zero = read_deepspeed(args.deepspeed) if args.deepspeed else None
    settings = settings_of(args, zero)  # a typo: one line, before any process starts
    if args.launcher == "none" and "RANK" not in os.environ:  # not already started by a launcher
        command = torchrun_command(train_argv(args), os.environ)
        if command is not None:
            return relaunch(command)

    # imported only here: a process that just re-launches under torchrun skips the model stack (~5 s)
    from evotune.parallel.env import process_group
    from evotune.train.loop import train

    with process_group(args.device, launcher=args.launcher, cpu_offload=bool(zero and zero.offload)) as env:
        try:
            summary = train(settings, env)
        except Preempted as stopped:  # all ranks stop after the same step: not a failure to report to the others
            if env.is_main:
                print(f"evotune: {stopped}", file=sys.stderr)
            return preempt.EXIT_CODE
    if env.is_main:
        print(f"evotune: done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")
        print(f"evotune: checkpoint in {summary['checkpoint']}")
        print(f"evotune: {summary['hf_kind']} in {summary['hf_dir']}")
        print(f"evotune: metrics in {summary['metrics']}")
    return 0
