"""Steps whose loss or gradient norm is NaN or infinite are skipped, counted, and bounded.

The loop (evotune/train/loop.py) learns the step's global loss and gradient
norm in the reduction it does for logging anyway; when either is not finite
it drops the gradients and does not step the optimizer or the scheduler, so
the weights stay the last finite ones. :class:`SkipBudget` counts those steps
(``skipped_steps`` in ``metrics.jsonl`` and the progress line) and ends the
run with :class:`DivergedError` after ``max_consecutive`` skips in a row or
when the skips exceed ``max_fraction`` of the run's steps (and
``max_consecutive``): a run that keeps
producing NaN is diverging (``lr`` too high, bad data), and going on would
only write useless checkpoints. docs/reliability.md has the whole policy.
"""

from __future__ import annotations

from collections.abc import Callable

from evotune.errors import EvotuneError


class DivergedError(EvotuneError):
    """Too many steps with a non-finite loss or gradient norm; nothing non-finite was saved."""


class SkipBudget:
    """Counts skipped steps; :meth:`step` raises :class:`DivergedError` when the budget is spent.

    ``skipped``: the skips of the run so far (a resumed run's count, from its checkpoint).
    ``lr``: the configured learning rate, for the message.
    """

    def __init__(self, max_consecutive: int, max_fraction: float, total_steps: int, skipped: int = 0,
                 lr: float | None = None):
        self.max_consecutive = max_consecutive
        # never below max_consecutive: in a short run the share alone would stop at the first skip
        self.max_total = max(int(max_fraction * total_steps), max_consecutive)
        self.skipped = skipped
        self.streak = 0
        self.first_bad: int | None = None  # the first skipped step of this process
        self.lr = lr

    def step(self, step: int, finite: bool, latest: Callable[[], str | None] = lambda: None) -> None:
        """Record optimizer step ``step`` (1-based) as applied (``finite``) or skipped; ``latest``
        gives the newest checkpoint, for the message."""
        if finite:
            self.streak = 0
            return
        self.skipped += 1
        self.streak += 1
        if self.first_bad is None:
            self.first_bad = step
        over = ([f"{self.streak} steps in a row (max_consecutive_skips={self.max_consecutive})"]
                if self.streak >= self.max_consecutive else [])
        if self.skipped > self.max_total:
            over.append(f"{self.skipped} steps in all (more than max_skipped_fraction of the run, "
                        f"{self.max_total} steps)")
        if over:
            lr = f" (now {self.lr:g})" if self.lr is not None else ""
            last_checkpoint = latest()
            kept = (f"the last checkpoint, with finite weights, is {last_checkpoint}" if last_checkpoint
                    else "no checkpoint was written")
            raise DivergedError(
                f"training diverged: the loss or gradient norm was NaN/inf at {' and '.join(over)}, first at step "
                f"{self.first_bad}; those steps were skipped and nothing non-finite was saved ({kept}); lower lr"
                f"{lr} or check the data around step {self.first_bad}, then start again or --resume from that "
                "checkpoint")
