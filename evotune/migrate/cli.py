"""``evotune migrate CONFIG -o OUT``: write the evotune config and print the table of every InternEvo key."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from evotune.errors import EvotuneError
from evotune.migrate.migration import migrate_internevo_config
from evotune.migrate.render import thousands
from evotune.migrate.rules import CHANGED, MAPPED, NOT_NEEDED, UNSUPPORTED
from evotune.migrate.translate import Row

_ORDER = {MAPPED: 0, CHANGED: 1, UNSUPPORTED: 2, NOT_NEEDED: 3}
_COLOUR = {MAPPED: "green", CHANGED: "yellow", UNSUPPORTED: "bold red", NOT_NEEDED: "dim"}
_HEADER = ("InternEvo key", "value", "status", "evotune", "note")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(rows: list[Row]) -> str:
    """The rows as plain text, grouped by status."""
    cells = [(r.key, _short(r.value), r.status, r.target, r.note) for r in sorted(rows, key=lambda r: _ORDER[r.status])]
    widths = [max(len(str(c[i])) for c in cells + [_HEADER]) for i in range(4)]
    out = ["  ".join(h.ljust(w) for h, w in zip(_HEADER, widths + [0])).rstrip()]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cell, widths + [0])).rstrip() for cell in cells]
    return "\n".join(out)


def _print_table(rows: list[Row], plain: bool) -> None:
    if plain:
        print(format_table(rows))
        return
    table = Table(title="InternEvo -> evotune")
    for name in _HEADER[:-1]:
        table.add_column(name, no_wrap=True)
    table.add_column(_HEADER[-1], overflow="fold")
    for r in sorted(rows, key=lambda r: _ORDER[r.status]):
        table.add_row(r.key, _short(r.value), f"[{_COLOUR[r.status]}]{r.status}[/]", r.target, r.note)
    Console().print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the InternEvo training config (a Python file of constants)")
    parser.add_argument("-o", "--output", required=True, help="where to write the evotune config")
    parser.add_argument("--world-size", type=int,
                        help="GPUs the InternEvo job ran on (sets its data-parallel size and tokens per step)")
    parser.add_argument("--target-world-size", type=int,
                        help="GPUs evotune will train on (default: --world-size)")
    parser.add_argument("--sequence-parallel-size", type=int,
                        help="evotune's sequence parallel size (default: InternEvo's, raised if needed to fit)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file")
    parser.add_argument("--plain", action="store_true", help="print the table as plain text")


def main(args: argparse.Namespace) -> int:
    for name in ("world_size", "target_world_size", "sequence_parallel_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvotuneError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if os.path.exists(args.output) and not args.force:
        raise EvotuneError(f"'{args.output}' already exists; pass --force to overwrite it")
    result = migrate_internevo_config(args.config, args.world_size, args.target_world_size, args.sequence_parallel_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(result.text)
    _print_table(result.rows, plain=args.plain or not sys.stdout.isatty())
    p = result.plan
    for note in result.assumptions:
        print(f"assumed: {note}")
    print(f"tokens per optimizer step: InternEvo {thousands(p.internevo_tokens_per_step)} = evotune "
          f"{thousands(p.tokens_per_step)} ({p.data_parallel_size} dp x {p.accumulative_counts} accumulation x "
          f"{p.max_length} tokens)")
    flag = f" --deepspeed {result.deepspeed}" if result.deepspeed else ""
    print(f"wrote {args.output}; train with: evotune train {args.output}{flag}")
    if result.unsupported:
        keys = ", ".join(r.key for r in result.unsupported)
        print(f"evotune: {len(result.unsupported)} InternEvo setting(s) have no evotune equivalent and were left out: "
              f"{keys}", file=sys.stderr)
        return 1
    return 0
