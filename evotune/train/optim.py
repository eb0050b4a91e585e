"""Build the optimizer from its config dict, using the fused kernel where one exists.

``torch.optim.AdamW`` picks its multi-tensor ("foreach") implementation by
default; the fused one does the whole update in one kernel per dtype/device
group, reads each parameter, gradient and state once, and keeps the step
counter on the device (no host synchronisation). It is used unless the config
names ``fused`` or ``foreach`` itself.

bitsandbytes' optimizers (``bitsandbytes.optim.AdamW8bit``, ``PagedAdamW8bit``,
... : the 8-bit state QLoRA users pick to save memory, 2 bytes per trained
parameter instead of AdamW's 8) run their update as a custom kernel on plain
tensors, and FSDP2's parameters are DTensors. Where every rank holds whole
parameters (one rank, or ``replicate``: :func:`evotune.parallel.fsdp.shards`
is 1) a parameter's local tensor *is* the parameter, so the optimizer steps on
the local tensors (:class:`_LocalTensorStep`) and its state is keyed, saved
and loaded by the parameters as any optimizer's. Where FSDP2 splits parameters
the run is refused at start (:func:`check_optimizer`): each rank would quantise
its own slice in blocks that move with the world size, so neither a resume at
another size nor a plain DCP checkpoint of that state would be right.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from evotune.config import build
from evotune.errors import EvotuneError


def wants_fused(optimizer_cls, device: torch.device | str) -> bool:
    """Whether ``optimizer_cls`` has a ``fused`` option and a fused kernel for ``device``."""
    try:
        params = inspect.signature(optimizer_cls).parameters
    except (TypeError, ValueError):
        return False
    return "fused" in params and torch.device(device).type in _get_fused_kernels_supported_devices()


def is_bitsandbytes(optimizer_cls) -> bool:
    """Whether the optimizer class comes from bitsandbytes (its kernels take plain tensors only)."""
    return isinstance(optimizer_cls, type) and optimizer_cls.__module__.split(".")[0] == "bitsandbytes"


def _spec_class(spec) -> type | None:
    """The ``type`` of an optimizer config dict (None for anything else)."""
    return spec.get("type") if isinstance(spec, dict) else None


def moment_bytes(spec: dict | None) -> int:
    """Bytes of optimizer state per trained parameter, for sizing memory before the optimizer exists
    ('auto' activation checkpointing): 2 for a bitsandbytes 8-bit optimizer (two 1-byte moments; its
    per-block scales add about 0.04), 8 otherwise (AdamW's two fp32 moments, what XTuner's configs use;
    one that holds more, such as ``amsgrad``, is counted as AdamW)."""
    cls = _spec_class(spec)
    if is_bitsandbytes(cls) and (cls.__name__.endswith("8bit") or spec.get("optim_bits") == 8):
        return 2
    return 8


def check_optimizer(spec: dict | None, n_shards: int, strategy: str) -> None:
    """Refuse, before the model is built, a bitsandbytes optimizer where FSDP2 splits each parameter."""
    cls = _spec_class(spec)
    if n_shards > 1 and is_bitsandbytes(cls):
        raise EvotuneError(
            f"optim_wrapper.optimizer.type={cls.__module__}.{cls.__name__}: bitsandbytes optimizers update "
            f"whole parameters, and {strategy} splits each one over {n_shards} ranks; train on one rank, or "
            "without --deepspeed (replicate: whole parameters on every rank), or use torch.optim.AdamW")


class _LocalTensorStep:
    """Mixed into a bitsandbytes optimizer class: each step runs on the parameters' local tensors.

    Used only where every rank holds whole parameters (:func:`check_optimizer`), so the local tensor
    of a DTensor parameter is all of it. Outside ``step`` the param groups and the state are keyed by
    the parameters themselves, so ``state_dict`` and DCP's ``get/set_optimizer_state_dict`` see an
    ordinary optimizer; inside, each DTensor is swapped for its local tensor (the same storage: the
    update lands in the parameter) with its gradient's local tensor, and swapped back after.
    """

    @torch.no_grad()
    def step(self, closure=None):
        swapped = []
        for group in self.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if isinstance(p, DTensor):
                    local = p.to_local()
                    local.grad = None if p.grad is None else p.grad.to_local()
                    if p in self.state:
                        self.state[local] = self.state.pop(p)
                    params[i] = local
                    swapped.append((params, i, p, local))
        try:
            return super().step(closure)
        finally:
            for params, i, p, local in swapped:
                params[i] = p
                local.grad = None  # the gradient's storage belongs to p.grad (freed by zero_grad)
                if local in self.state:
                    self.state[p] = self.state.pop(local)


def build_optimizer(spec: dict, params: Iterable, device: torch.device | str) -> torch.optim.Optimizer:
    """``build(spec, params=params)``, with ``fused=True`` added when :func:`wants_fused` says so, and a
    bitsandbytes optimizer over DTensor parameters stepping on their local tensors (module docstring)."""
    params = list(params)
    cls = _spec_class(spec)
    if (isinstance(spec, dict) and "fused" not in spec and "foreach" not in spec
            and wants_fused(cls, device)):
        spec = {**spec, "fused": True}
    if is_bitsandbytes(cls) and any(isinstance(p, DTensor) for p in params):
        spec = {**spec, "type": type(cls.__name__, (_LocalTensorStep, cls), {"__module__": cls.__module__})}
    return build(spec, params=params)
