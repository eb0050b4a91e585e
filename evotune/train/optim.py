"""Build the optimizer from its config dict, using the fused kernel where one exists.

``torch.optim.AdamW`` picks its multi-tensor ("foreach") implementation by
default; the fused one does the whole update in one kernel per dtype/device
group, reads each parameter, gradient and state once, and keeps the step
counter on the device (no host synchronisation). It is used unless the config
names ``fused`` or ``foreach`` itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from evotune.config import build


def wants_fused(optimizer_cls, device: torch.device | str) -> bool:
    """Whether ``optimizer_cls`` has a ``fused`` option and a fused kernel for ``device``."""
    try:
        params = inspect.signature(optimizer_cls).parameters
    except (TypeError, ValueError):
        return False
    return "fused" in params and torch.device(device).type in _get_fused_kernels_supported_devices()


def build_optimizer(spec: dict, params: Iterable, device: torch.device | str) -> torch.optim.Optimizer:
    """``build(spec, params=params)``, with ``fused=True`` added when :func:`wants_fused` says so."""
    if (isinstance(spec, dict) and "fused" not in spec and "foreach" not in spec
            and wants_fused(spec.get("type"), device)):
        spec = {**spec, "fused": True}
    return build(spec, params=list(params))
