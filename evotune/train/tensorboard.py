"""Optional TensorBoard logging: the same records as ``metrics.jsonl``, as scalars.

Enabled by ``visualizer = dict(type=TensorBoardWriter)`` (optionally with
``log_dir``; default ``<work_dir>/tensorboard``) or ``visualizer = 'tensorboard'``
in the config. Needs the ``tensorboard`` package (``pip install 'evotune[tensorboard]'``).
The writer has :class:`evotune.train.metrics.MetricsWriter`'s interface, so the
loop hands every step record to both.
"""

from __future__ import annotations

import math
import os

from evotune.config import build
from evotune.errors import EvotuneError

DEFAULT_DIR = "tensorboard"


class TensorBoardWriter:
    """Writes each numeric field of a record (except ``step``) as a scalar at that step (rank 0 only)."""

    def __init__(self, log_dir: str, enabled: bool = True):
        self.log_dir = log_dir
        self._writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise EvotuneError("visualizer: TensorBoard logging needs the tensorboard package; "
                                   "pip install 'evotune[tensorboard]' or remove 'visualizer' from the config") from None
            self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, record: dict) -> None:
        if self._writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def build_visualizer(spec, work_dir: str, enabled: bool = True) -> TensorBoardWriter | None:
    """The config's ``visualizer``: None, ``'tensorboard'`` or ``dict(type=TensorBoardWriter, ...)``."""
    if spec is None:
        return None
    if spec == "tensorboard":
        spec = {"type": TensorBoardWriter}
    if not (isinstance(spec, dict) and spec.get("type") in (TensorBoardWriter, "TensorBoardWriter")):
        raise EvotuneError(f"visualizer: {spec!r} is not supported; use None, 'tensorboard' or "
                           "dict(type=TensorBoardWriter, log_dir=...)")
    log_dir = spec.get("log_dir") or os.path.join(work_dir, DEFAULT_DIR)
    return build({**spec, "log_dir": log_dir}, enabled=enabled)
