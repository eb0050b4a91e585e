"""Step metrics: log lines, ``metrics.jsonl``, throughput and model FLOPs.

Model FLOPs are counted on the real document lengths (docs/performance.md): per
trained token ``6 * P`` for the matrix parameters (every linear layer,
embeddings excluded since a lookup does no matmul, the head included), plus
causal attention ``6 * L * d_attn * n^2`` for each document segment of length
``n`` (forward ``2 * L * d_attn * n^2`` for QK^T and AV over the causal half,
backward twice that). Activation recomputation is not counted: MFU reports
useful work, not work done.

``metrics.jsonl`` is strict JSON, one object per line: a non-finite value (the
loss of a skipped step, docs/reliability.md) is written as ``null``, so every
JSON reader takes the file. On resume :func:`trim_jsonl` drops what the
checkpoint does not cover, and a last line torn by a kill.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from evotune.errors import EvotuneError

# dense bf16 datasheet peak TFLOP/s by device name fragment (docs/performance.md names the one used)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0}


def matmul_params(llm: nn.Module) -> int:
    """Parameters of linear layers (incl. the head), not of embeddings or norms; by shape, because a
    bitsandbytes 4-bit layer (an ``nn.Linear``) stores two or more values per element of its weight."""
    return sum(m.in_features * m.out_features for m in llm.modules() if isinstance(m, nn.Linear))


def attention_dim(llm: nn.Module) -> tuple[int, int]:
    cfg = llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_attention_heads * head_dim


def model_flops(n_matmul_params: int, n_layers: int, attn_dim: int, doc_lengths: Iterable[int]) -> float:
    """Training FLOPs (forward + backward) for documents of the given lengths."""
    lengths = np.asarray(list(doc_lengths), dtype=np.float64)
    return 6.0 * n_matmul_params * lengths.sum() + 6.0 * n_layers * attn_dim * float((lengths**2).sum())


def peak_tflops(device: torch.device) -> float | None:
    """Peak dense bf16 TFLOP/s of the device, from EVOTUNE_PEAK_TFLOPS or the name."""
    if "EVOTUNE_PEAK_TFLOPS" in os.environ:
        return float(os.environ["EVOTUNE_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def strict_json(record: dict) -> str:
    """``record`` as one line of standard JSON: NaN and infinities become ``null``."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                      allow_nan=False)


def trim_jsonl(path: str, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (the checkpoint resumed from); later ones were lost.

    A last line that does not parse (the run was killed while writing it) is
    dropped with a message; a bad line before the last one is an error naming
    it, as something other than a kill damaged the file. The file is replaced
    atomically, so a kill during the trim loses nothing.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    kept = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for i, (n, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(numbered) - 1:
                raise EvotuneError(f"{path}: line {n} is not JSON ({line[:60]!r}); fix or delete that line, then "
                                   "resume again") from None
            print(f"evotune: {path}: dropped its last line, cut short when the run was killed ({line[:60]!r})")
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Append one JSON object per step to ``<work_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str, enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self._file = open(path, "a" if append else "w", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(strict_json(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
