"""``evotune plot WORK_DIR``: the run's ``metrics.jsonl`` as one PNG.

Four panels over optimizer steps: loss (training loss, ``loss/<type>`` per data
type, ``val_loss/<name>`` per validation set), learning rate, gradient norm,
and throughput in tokens per GPU per second. A resumed run appends to
``metrics.jsonl`` and may write a step twice; the last record of a step wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable

from evotune.errors import EvotuneError

METRICS_FILE = "metrics.jsonl"
DEFAULT_PNG = "metrics.png"
# panel titles, in reading order
PANELS = ("loss", "learning rate", "gradient norm", "throughput (tokens/GPU/s)")


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl file; an EvotuneError names a missing file or a bad line."""
    if not os.path.isfile(path):
        raise EvotuneError(f"{path} does not exist: pass the work_dir of a training run (it holds {METRICS_FILE})")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvotuneError(f"{path}:{line_no}: not JSON ({e.msg}); the file is damaged, "
                                   "delete that line") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise EvotuneError(f"{path}:{line_no}: a metrics record is an object with an integer 'step'")
            records.append(record)
    if not records:
        raise EvotuneError(f"{path} holds no records yet: the run has not finished a step")
    return records


def series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step, the last record of a step winning."""
    by_step = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[r["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _panel_keys(records: list[dict]) -> dict[str, list[str]]:
    keys = sorted({k for r in records for k in r})
    return {
        PANELS[0]: (["loss"] if "loss" in keys else []) + [k for k in keys if k.startswith("loss/")]
                   + [k for k in keys if k.startswith("val_loss")],
        PANELS[1]: [k for k in ("lr",) if k in keys],
        PANELS[2]: [k for k in ("grad_norm",) if k in keys],
        PANELS[3]: [k for k in ("tgs",) if k in keys],
    }


def plot_metrics(records: list[dict], title: str | None = None):
    """A matplotlib Figure with the four panels (titles: :data:`PANELS`)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    for ax, (panel, keys) in zip(axes, _panel_keys(records).items()):
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        for key in keys:
            steps, values = series(records, key)
            if key.startswith("val_loss"):
                ax.plot(steps, values, marker="o", label=key)
            elif key.startswith("loss/"):
                ax.plot(steps, values, linewidth=1, alpha=0.8, label=key)
            else:
                ax.plot(steps, values, linewidth=1.5, label=key)
        if len(keys) > 1:
            ax.legend(fontsize="small")
        if not keys:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))  # learning rates are small numbers
    if title:
        fig.suptitle(title)
    return fig


def plot_work_dir(work_dir: str, out: str | None = None) -> str:
    """Write the PNG for a work dir (or a metrics.jsonl file); returns its path."""
    if out is not None and not out.lower().endswith(".png"):
        raise EvotuneError(f"-o {out}: the plot is written as PNG; name the file *.png")
    path = work_dir if os.path.isfile(work_dir) else os.path.join(work_dir, METRICS_FILE)
    records = read_metrics(path)
    out = out or os.path.join(os.path.dirname(path), DEFAULT_PNG)
    fig = plot_metrics(records, title=os.path.basename(os.path.dirname(os.path.abspath(path))))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work_dir", metavar="WORK_DIR", help=f"a training work dir (or its {METRICS_FILE})")
    parser.add_argument("-o", "--output", default=None, metavar="FILE.png",
                        help=f"where to write the PNG (default: WORK_DIR/{DEFAULT_PNG})")


def main(args: argparse.Namespace) -> int:
    out = plot_work_dir(args.work_dir, args.output)
    print(f"evotune plot: wrote {out}")
    return 0
