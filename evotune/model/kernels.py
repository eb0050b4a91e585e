"""Fused kernels for the elementwise work around the matrix products: Liger-Kernel or inductor.

Eager transformers runs RMSNorm, SiLU * up, rotary embedding, residual adds and
casts as separate memory-bound kernels (21% + 15% + 6% of an eager llama-1b
step on an H100, docs/performance.md). Two ways to fuse them:

* ``'inductor'``: ``torch.compile`` of each decoder layer
  (:mod:`evotune.model.compile`) fuses all of them, rotary and residuals
  included.
* ``'liger'``: Liger-Kernel's Triton kernels (``liger-kernel``, optional and
  detected), put on the *instances* this model holds: each RMSNorm module's
  ``forward`` becomes ``liger_rms_norm`` (casting mode 'llama', what
  transformers' Llama/Qwen2/Mistral RMSNorm compute) and each gated MLP with
  SiLU becomes ``down(liger_swiglu(gate(x), up(x)))``. No transformers class or
  module function is patched, so other models in the process are untouched.
  Rotary embedding stays transformers' own: it is a module-level function that
  attention calls directly, and replacing it would patch transformers for
  everyone (inductor fuses it when the layers are compiled).

``fused_kernels='auto'`` (``SupervisedFinetune``'s default): inductor when the
layers are compiled, else Liger when it is installed and the model trains on
CUDA, else none. Which one is faster is measured by ``bench/gpu_suite.sh``.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from evotune.errors import EvotuneError

try:  # pragma: no cover - only where liger-kernel (Triton, CUDA) is installed
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
except ImportError:
    liger_rms_norm = liger_swiglu = None

FUSED_KERNELS = ("auto", "liger", "inductor", "none")


def liger_available(device: torch.device) -> bool:
    return liger_rms_norm is not None and device.type == "cuda"


def _rms_norm_forward(self, hidden_states):
    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=0.0, casting_mode="llama",
                          in_place=False)


def _swiglu_forward(self, x):
    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(module: nn.Module) -> bool:
    """transformers' Llama-style RMSNorm: ``weight * normalized(x).to(input dtype)``, eps in
    ``variance_epsilon``, no offset (Gemma's ``1 + weight`` norms are other classes and are left alone)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and \
        isinstance(getattr(module, "weight", None), torch.Tensor) and not type(module).__name__.startswith("Gemma")


def _is_silu_gated_mlp(module: nn.Module) -> bool:
    """``down(act(gate(x)) * up(x))`` with SiLU (``nn.SiLU`` or transformers' ``SiLUActivation``)."""
    act = getattr(module, "act_fn", None)
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
        (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")


def apply_liger(llm: nn.Module) -> dict[str, int]:
    """Liger's RMSNorm and SwiGLU on ``llm``'s own module instances; returns how many of each."""
    if liger_rms_norm is None:
        raise EvotuneError("fused_kernels='liger' needs the liger-kernel package (pip install liger-kernel)")
    counts = {"rms_norm": 0, "swiglu": 0}
    for module in llm.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_silu_gated_mlp(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            counts["swiglu"] += 1
    return counts


def resolve(fused_kernels: str, compiled: bool, device: torch.device) -> tuple[str, str]:
    """``(kernels used, why)`` for the setting, whether the layers are compiled, and the device."""
    if fused_kernels not in FUSED_KERNELS:
        raise EvotuneError(f"fused_kernels={fused_kernels!r}: use one of {', '.join(FUSED_KERNELS)}")
    if fused_kernels == "liger" and not liger_available(device):
        raise EvotuneError(f"fused_kernels='liger' needs the liger-kernel package and a CUDA device (here: "
                           f"{device.type}, liger-kernel {'installed' if liger_rms_norm else 'not installed'})")
    if fused_kernels == "inductor" and not compiled:
        raise EvotuneError("fused_kernels='inductor' fuses through torch.compile: set torch_compile='auto' or True "
                           "(on a GPU with bf16 compute)")
    if fused_kernels != "auto":
        return fused_kernels, "as set"
    if compiled:
        return "inductor", "the decoder layers are compiled"
    if liger_available(device):
        return "liger", "liger-kernel is installed and the layers are not compiled"
    return "none", f"layers not compiled, liger-kernel {'needs CUDA' if liger_rms_norm else 'not installed'}"
