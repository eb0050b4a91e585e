"""Floating-point dtypes as users and files spell them: the one parser and the one namer.

Configs, flags and checkpoint files write dtypes as strings ('bfloat16',
'bf16', 'torch.float32' in InternEvo configs, 'float32' in ``config.json``);
evotune reads every one of them with :func:`parse_dtype` and writes them with
:func:`dtype_name`, so one spelling is accepted everywhere or nowhere.
"""

from __future__ import annotations

import torch

from evotune.errors import EvotuneError

_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value, default: torch.dtype | None = None, *, what: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a dtype or a name ('bfloat16', 'bf16', 'torch.float32').

    ``None`` and ``'auto'`` give ``default``. Anything else is an
    :class:`EvotuneError` that starts with ``what`` (the flag, key or file the
    value came from).
    """
    if value is None or value == "auto":
        return default
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _NAMES:
        raise EvotuneError(f"{what}: unknown dtype {value!r}: use one of bfloat16, float16, float32 or auto")
    return _NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for ``torch.bfloat16``: the spelling of ``config.json`` and of evotune's messages."""
    return str(dtype).removeprefix("torch.")
