"""Stop cleanly on a signal: finish the step, save a checkpoint, exit with :data:`EXIT_CODE`.

Clusters announce a preemption or a time limit with a signal (slurm:
``#SBATCH --signal=USR1@120`` or ``srun --signal``; Kubernetes and torchrun
send SIGTERM; Ctrl-C is SIGINT). :class:`StopSignals` turns SIGTERM, SIGINT
and SIGUSR1 into a flag; the loop (evotune/train/loop.py) sums the flag over
all ranks in the reduction it does every step anyway, so every rank stops
after the same step, then saves a checkpoint and raises :class:`Preempted`.
``evotune train`` exits with :data:`EXIT_CODE` and ``--resume auto`` continues
bitwise. A second SIGINT exits at once (code 130), leaving at worst a
temporary folder that the next start removes (docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; distinct from errors (1, 2) and from being killed (128+N)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint``."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"checkpoint {checkpoint} saved" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {signal_name} after step {step}: {where}; continue with --resume auto")


class StopSignals:
    """``with StopSignals() as stop:`` ... ``stop.requested`` is the first signal's name, or None.

    Handlers are installed only in the main thread (Python allows no other) and
    the previous ones are put back on exit.
    """

    def __init__(self, is_main: bool = True):
        self.is_main = is_main
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            print(f"evotune: {name} after {self.requested}: exiting now, without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(130)
        if self.requested is None:
            self.requested = name
            if self.is_main:
                print(f"evotune: got {name}: finishing this step, saving a checkpoint, then exiting "
                      f"(code {EXIT_CODE}; press Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
