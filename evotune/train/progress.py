"""Progress bar with ETA and one log line per step, on rank 0 only.

On a terminal a rich progress bar stays at the bottom with the log lines above
it; in a pipe or a log file (slurm) only the log lines are printed, each with
the ETA, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, enabled: bool = True, start: int = 0):
        self.total = total
        self.enabled = enabled
        self.first = start  # a resumed run starts counting here
        self.done = start
        self.start = time.perf_counter()
        self.console = Console(file=sys.stdout, highlight=False)
        self._bar = None
        if enabled and self.console.is_terminal:
            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self._task = self._bar.add_task("train", total=total, completed=start)
            self._bar.start()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def log(self, r: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (self.done + 1 - self.first) * (self.total - self.done - 1)
        line = (f"step {r['step']}/{self.total}  loss {r['loss']:.4f}  lr {r['lr']:.3e}  "
                f"grad_norm {r['grad_norm']:.3f}  tokens {r['tokens']}  tgs {r['tgs']:.1f}  "
                f"data {r['data_time'] * 1000:.1f}ms")
        if "mfu" in r:
            line += f"  mfu {100 * r['mfu']:.1f}%"
        if r.get("skipped_steps"):  # NaN/inf steps not applied (evotune/train/nonfinite.py)
            line += f"  skipped {r['skipped_steps']}"
        for key, value in r.items():
            if key.startswith(("loss/", "val_loss/")):
                line += f"  {key} {value:.4f}"
        self.print(line + f"  eta {_fmt_time(eta)}")

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
