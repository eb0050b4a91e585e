"""``evotune batches CONFIG --steps N``: the micro-batches one rank would train on, as JSON lines.

The data are built from the settings exactly as training builds them
(:func:`evotune.data.build.build_data`: ``train_dataset`` and
``train_dataloader.sampler``, ``micro_num = batch_size * accumulative_counts``
packs per optimizer step per data-parallel rank), so the
output can be compared with InternEvo's batches or inspected before a long run.
One line per micro-batch: ``{"step", "micro", "input_ids", "labels",
"cu_seqlens", "position_ids", "type_ids"}``; a micro-batch of ``batch_size``
packs is their concatenation (one row, ``cu_seqlens`` offset), as the model
sees it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from evotune.data.build import build_data
from evotune.errors import EvotuneError
from evotune.settings import Settings, load_settings

FIELDS = ("input_ids", "labels", "cu_seqlens", "position_ids", "type_ids")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps to write")
    parser.add_argument("--world-size", type=int, default=1,
                        help="number of processes (data parallel x sequence_parallel_size); default 1")
    parser.add_argument("--rank", type=int, default=0, help="global rank whose batches are written; default 0")
    parser.add_argument("--out", help="output file (default: standard output)")
    parser.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")


def _row(packs: list[dict]) -> dict:
    """Concatenate the packs of one micro-batch into the row the model sees."""
    row = {k: np.concatenate([p[k] for p in packs]).tolist() for k in FIELDS if k != "cu_seqlens"}
    cu, offset = [0], 0
    for p in packs:
        cu += (np.asarray(p["cu_seqlens"][1:], dtype=np.int64) + offset).tolist()
        offset += len(p["input_ids"])
    row["cu_seqlens"] = cu
    return row


def micro_batches(settings: Settings, steps: int, world_size: int = 1, rank: int = 0):
    """Yield ``(step, micro, row)`` for ``steps`` optimizer steps of global rank ``rank``."""
    sp = settings.parallel.sequence_parallel_size
    if world_size < 1 or world_size % sp:
        raise EvotuneError(f"--world-size {world_size} must be a positive multiple of sequence_parallel_size {sp}")
    if not 0 <= rank < world_size:
        raise EvotuneError(f"--rank {rank} must lie in [0, --world-size {world_size})")
    accum = settings.optim.accumulative_counts
    dataset, sampler = build_data(settings.data, accum, world_size // sp, rank // sp)
    stream = iter(sampler)
    for step in range(steps):
        for micro in range(accum):
            yield step, micro, _row([dataset[next(stream)] for _ in range(settings.data.batch_size)])


def main(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise EvotuneError(f"--steps must be >= 0, got {args.steps}")
    settings = load_settings(args.config, args.cfg_options)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for step, micro, row in micro_batches(settings, args.steps, args.world_size, args.rank):
            out.write(json.dumps({"step": step, "micro": micro, **row}, separators=(",", ":")) + "\n")
    finally:
        if args.out:
            out.close()
    return 0
