"""``evotune inspect``: what a tokenized folder holds, and what the model is trained on.

Counts per data type (top-level folder; ``train/<type>`` and ``valid/<type>``
when the folder is an ``evotune tokenize`` output), document length
percentiles, and a few documents decoded with the spans that are never a
target marked: dim on a terminal, ``[[...]]`` otherwise (or with ``--plain``).

A token is a target when it is positive and not the first of its document
(InternEvo's labels: the next token of the same document, kept only when
positive), so the marked spans are exactly where no loss is computed. Files
are read through the cached index of :mod:`evotune.data.ftdp`, as training
reads them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from evotune.data.ftdp import FtdpFile, load_files, load_intern_repo_tokenized_dataset
from evotune.errors import EvotuneError

SPLIT_FOLDERS = ("train", "valid")
PERCENTILES = (50, 90, 99)
_BATCH_TOKENS = 1 << 23  # tokens examined at a time (bounded memory on big files)


@dataclass
class GroupStats:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    supervised: int = 0
    no_loss: int = 0  # documents without any target


@dataclass
class InspectStats:
    groups: dict[str, GroupStats] = field(default_factory=dict)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    shown: list[tuple[str, int, np.ndarray]] = field(default_factory=list)  # (file, meta row, tokens)

    @property
    def total(self) -> GroupStats:
        t = GroupStats()
        for g in self.groups.values():
            for name in vars(t):
                setattr(t, name, getattr(t, name) + getattr(g, name))
        return t


def supervised_counts(f: FtdpFile) -> np.ndarray:
    """Targets per meta row: positive tokens after each document's first position."""
    order = np.argsort(f.row_start, kind="stable")
    starts, lengths = f.row_start[order].astype(np.int64), f.lengths[order].astype(np.int64)
    out = np.zeros(len(order), np.int64)
    ends = starts + lengths
    a = 0
    while a < len(order):
        b = max(a + 1, int(np.searchsorted(ends, starts[a] + _BATCH_TOKENS, side="right")))
        lo, hi = int(starts[a]), int(ends[b - 1])
        c = np.concatenate([[0], np.cumsum(np.asarray(f.tokens[lo:hi]) > 0, dtype=np.int64)])
        s, e = starts[a:b] - lo, ends[a:b] - lo
        out[order[a:b]] = c[e] - c[np.minimum(s + 1, e)]
        a = b
    return out


def _group(rel_path: str, split_root: bool) -> str:
    parts = rel_path.split("/")
    depth = 2 if split_root else 1
    return "/".join(parts[:depth]) if len(parts) > depth else "/".join(parts[:-1]) or "."


def inspect_path(path: str | os.PathLike, show: int = 0) -> InspectStats:
    """Counts of a folder (walked as training walks it) or of one ``.bin`` file, and its first ``show`` documents."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".bin"):
            raise EvotuneError(f"{path}: expected a .bin file (with its .bin.meta) or a folder of them")
        folder = load_files(os.path.dirname(path) or ".", [os.path.basename(path)])
        split_root = False
    elif os.path.isdir(path):
        folder = load_intern_repo_tokenized_dataset(path)
        tops = {n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)) and not n.startswith(".")}
        split_root = bool(tops) and tops <= set(SPLIT_FOLDERS)
    else:
        raise EvotuneError(f"{path}: no such file or folder")
    stats = InspectStats()
    lengths = []
    for f in folder.files:
        g = stats.groups.setdefault(_group(f.rel_path, split_root), GroupStats())
        sup = supervised_counts(f)
        g.files += 1
        g.documents += len(f.lengths)
        g.tokens += int(f.lengths.sum())
        g.supervised += int(sup.sum())
        g.no_loss += int((sup == 0).sum())
        lengths.append(np.asarray(f.lengths, np.int64))
        for row in range(min(show - len(stats.shown), len(f.lengths))):
            stats.shown.append((f.path, row, f.document(row)))
    stats.lengths = np.concatenate(lengths)
    return stats


def trained_runs(tokens: Sequence[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive (is_target, input ids) runs of one document."""
    runs: list[tuple[bool, list[int]]] = []
    for i, t in enumerate(tokens):
        t = int(t)
        target = t > 0 and i > 0
        if runs and runs[-1][0] == target:
            runs[-1][1].append(abs(t))
        else:
            runs.append((target, [abs(t)]))
    return runs


def pack_tokens(pack: dict) -> list[int]:
    """A pack's input ids signed as InternEvo's are (negative: not a target), for :func:`render_document`:
    token ``i`` is a target when ``labels[i - 1]`` is set."""
    ids, labels = pack["input_ids"], pack["labels"]
    return [int(t) if i and labels[i - 1] != -100 else -int(t) for i, t in enumerate(ids)]


def render_document(tokens: Sequence[int], decode: Callable[[list[int]], str] | None, plain: bool):
    """A document with its non-target spans marked: ``[[...]]`` text when ``plain``, else a dim rich Text."""
    from rich.text import Text

    show = decode or (lambda ids: " ".join(map(str, ids)) + " ")
    if plain:
        return "".join(show(ids) if target else f"[[{show(ids)}]]" for target, ids in trained_runs(tokens))
    text = Text()
    for target, ids in trained_runs(tokens):
        text.append(show(ids), style=None if target else "dim")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Counts of an InternEvo tokenized folder or .bin file, and documents with the spans "
                          "that carry no loss marked (dim, or [[...]] with --plain).")
    parser.add_argument("path", metavar="FOLDER_OR_FILE", help="a tokenized folder or one .bin file")
    parser.add_argument("--tokenizer", metavar="PATH", help="decode shown documents with this tokenizer "
                                                            "(else token ids are shown)")
    parser.add_argument("--show", type=int, default=2, metavar="N", help="documents to show (default 2)")
    parser.add_argument("--plain", action="store_true", help="mark spans with [[...]] even on a terminal")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.show < 0:
        raise EvotuneError(f"--show {args.show}: give 0 or more")
    decode = None
    if args.tokenizer:
        from evotune.data.tokenize import load_codec

        decode = load_codec(args.tokenizer).decode
    stats = inspect_path(args.path, args.show)
    console = Console(highlight=False)
    plain = args.plain or not console.is_terminal
    table = Table(title=args.path)
    for col in ("type", "files", "documents", "tokens", "supervised", "no-loss docs"):
        table.add_column(col, justify="left" if col == "type" else "right")
    rows = [*sorted(stats.groups.items()), ("total", stats.total)]
    for name, g in rows:
        table.add_row(name, f"{g.files:,}", f"{g.documents:,}", f"{g.tokens:,}", f"{g.supervised:,}",
                      f"{g.no_loss:,}", end_section=name == rows[-2][0])
    console.print(table)
    n = stats.lengths
    pct = np.percentile(n, PERCENTILES, method="nearest")
    console.print("document length: min {:,}, ".format(int(n.min()))
                  + ", ".join(f"p{p} {int(v):,}" for p, v in zip(PERCENTILES, pct))
                  + f", max {int(n.max()):,}, mean {n.mean():,.1f}")
    for path, row, tokens in stats.shown:
        console.print(f"\n--- {path} row {row}: {len(tokens):,} tokens, "
                      f"{sum(len(ids) for t, ids in trained_runs(tokens) if t):,} targets "
                      f"({'[[...]]' if plain else 'dim'} = no loss)", markup=False)
        console.print(render_document(tokens, decode, plain), markup=False, soft_wrap=True)
    return 0
