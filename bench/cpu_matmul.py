"""bf16 matrix products computed in fp32 blocks on the CPU, so that a 7B-wide memory benchmark finishes there.

Why: on a CPU without AVX512-BF16 or AMX (the AMD EPYC VMs this project's
benchmarks also run on), PyTorch's bf16 GEMMs are slow, and some layouts
fall to a reference loop: ``grad @ W`` with a row-major ``W`` (every linear
layer's input gradient, bitsandbytes' 4-bit backward) ran at 0.26 GFLOP/s,
``x @ W.T`` at 17, while fp32 ran at 105 (2 vCPUs, torch 2.13, 512x4096x4096
and 2048x4096x14336 products). One QLoRA step of one 7B-wide layer did not
finish in 15 minutes. Inside :class:`Fp32Matmul`, every bf16 ``mm`` /
``addmm`` / ``bmm`` / ``baddbmm`` / ``linear`` on plain CPU tensors (also those autograd
runs in the backward, and bitsandbytes' 4-bit forward, which dequantises and
calls ``linear``) is computed in fp32 blocks of ``BLOCK`` x ``BLOCK`` with an
fp32 accumulator, the result stored in bf16 as before.

What it changes for a memory measurement: the tensors a step keeps are the
same (same shapes and dtypes, same saved activations); each product adds at
most three fp32 blocks (48 MiB at ``BLOCK`` = 2048) of transients; the
arithmetic differs from a bf16 GEMM by rounding (fp32 accumulation, as on a
GPU). Not used by evotune itself: a benchmark's way to run on such a machine,
printed in its header when on.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BLOCK = 2048
_aten = torch.ops.aten


def blocked_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two 2-D tensors, computed in fp32 blocks, returned in ``a``'s dtype."""
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    for i in range(0, m, BLOCK):
        for j in range(0, n, BLOCK):
            acc = torch.zeros(min(BLOCK, m - i), min(BLOCK, n - j), dtype=torch.float32, device=a.device)
            for p in range(0, k, BLOCK):
                acc.addmm_(a[i:i + BLOCK, p:p + BLOCK].float(), b[p:p + BLOCK, j:j + BLOCK].float())
            out[i:i + BLOCK, j:j + BLOCK] = acc
    return out


def _plain_bf16_cpu(tensors) -> bool:
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    # parameters (a frozen head's weight) count as plain; tensor subclasses (DTensor) are left to themselves
    return bool(ts) and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                            and t.dtype == torch.bfloat16 for t in ts)


class Fp32Matmul(TorchDispatchMode):
    """Within it, bf16 CPU matrix products run through :func:`blocked_mm`; ``routed`` counts them by op."""

    def __init__(self):
        super().__init__()
        self.routed: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._route(func, args, kwargs)
        if out is NotImplemented:
            return func(*args, **kwargs)
        self.routed[str(func)] = self.routed.get(str(func), 0) + 1
        return out

    def _route(self, func, args, kwargs):
        if func is _aten.mm.default and _plain_bf16_cpu(args):
            return blocked_mm(*args)
        if func is _aten.addmm.default and _plain_bf16_cpu(args):
            bias, a, b = args
            return _scaled_sum(blocked_mm(a, b), bias, kwargs)
        if func is _aten.linear.default and _plain_bf16_cpu(args):  # reaches here below autograd (bitsandbytes)
            x, weight, bias = (*args, None)[:3]
            out = blocked_mm(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])
            return out if bias is None else out + bias
        if func is _aten.bmm.default and _plain_bf16_cpu(args):
            return _blocked_bmm(*args)
        if func is _aten.baddbmm.default and _plain_bf16_cpu(args):
            bias, a, b = args
            return _scaled_sum(_blocked_bmm(a, b), bias, kwargs)
        if str(func) == "bitsandbytes.gemm_4bit.default" and _plain_bf16_cpu(args[:1]):
            # bitsandbytes' CPU kernel is its default one (dequantise, then linear): run that here with
            # this mode on again, so that its product is routed too
            from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

            with self:
                return _gemm_4bit_default_impl(*args, **kwargs)
        return NotImplemented


def _blocked_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([blocked_mm(a[i], b[i]) for i in range(a.shape[0])])


def _scaled_sum(product: torch.Tensor, bias: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``beta * bias + alpha * product``, as ``addmm``/``baddbmm`` define it."""
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if alpha != 1:
        product = product * alpha
    return product if beta == 0 else product + (bias if beta == 1 else bias * beta)
