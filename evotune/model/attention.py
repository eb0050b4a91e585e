"""Varlen attention registered with ``transformers.AttentionInterface``.

Document boundaries reach the kernel as the forward keyword arguments that
transformers already passes through its models (``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``), so no model class is
patched. Because no mask function is registered under this name, transformers
builds no ``[S, S]`` mask either (that mask alone is 1 GB at 32k tokens).

Kernels, chosen per call by the device of the query:

* CUDA: the first of :data:`VARLEN_KERNELS` that imports (and, for
  FlashAttention-4, runs on this GPU): ``flash_attn_4`` (the ``flash-attn-4``
  CuTe package, ``flash_attn.cute``, Hopper and newer), ``flash_attn``
  (flash-attn 2/3's ``flash_attn_varlen_func``), ``torch`` (PyTorch's
  ``torch.nn.attention.varlen.varlen_attn``; its causal flag changed between
  releases, so the signature is read once at import). All three compute exact
  attention; ``use_varlen_kernel(name)`` pins one (``bench/train_throughput.py
  --attn-kernel`` measures each). q/k/v go to the kernel in one 16-bit dtype
  (autocast's, see ``_kernel_inputs``).
* CPU, or fp32 on CUDA: no varlen kernel has a CPU backward (or takes fp32), so
  each document runs causal SDPA on its own and the outputs are concatenated:
  exact, and what the tests use.

Without ``cu_seq_lens_q`` (generation, plain evaluation) position resets in a
single row are turned into boundaries (read from the device once per forward,
not once per layer); otherwise plain causal SDPA runs.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from evotune.parallel.ulysses import sequence_parallel_attention

ATTN_NAME = "evotune_varlen"

try:  # pragma: no cover - only on machines with flash-attn
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # pragma: no cover - only on machines with flash-attn-4 (and its CUDA/CuTe dependencies)
    from flash_attn.cute import flash_attn_varlen_func as fa4_varlen_func
except ImportError:
    fa4_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch < 2.10
    varlen_attn = None
    _VARLEN_PARAMS = set()


VARLEN_KERNELS = ("flash_attn_4", "flash_attn", "torch")  # the runtime's order of preference
_pinned: str | None = None


def available_kernels(device: torch.device | None = None) -> list[str]:
    """The varlen kernels that import here, in order of preference (FlashAttention-4 needs compute
    capability 9.0 or newer)."""
    names = []
    if fa4_varlen_func is not None and torch.cuda.is_available() and \
            torch.cuda.get_device_capability(device)[0] >= 9:
        names.append("flash_attn_4")
    if flash_attn_varlen_func is not None:
        names.append("flash_attn")
    if varlen_attn is not None:
        names.append("torch")
    return names


def use_varlen_kernel(name: str | None) -> None:
    """Pin the CUDA varlen kernel (None: the first available)."""
    global _pinned
    if name is not None and name not in VARLEN_KERNELS:
        raise ValueError(f"varlen kernel {name!r}: one of {', '.join(VARLEN_KERNELS)}")
    _pinned = name


def varlen_kernel(device: torch.device | None = None) -> str:
    """The kernel the next CUDA varlen call uses."""
    names = available_kernels(device)
    if _pinned is not None:
        if _pinned not in names:
            raise RuntimeError(f"varlen kernel {_pinned!r} is not available here (available: {names})")
        return _pinned
    if not names:
        raise RuntimeError("varlen attention on CUDA needs torch>=2.10, flash-attn or flash-attn-4")
    return names[0]


@functools.cache
def _kernel_for(device: torch.device, pinned: str | None) -> str:
    return varlen_kernel(device)


def _cuda_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """q/k/v: [T, H, D] on CUDA. Returns [T, Hq, D]."""
    kernel = _kernel_for(q.device, _pinned)
    if kernel == "flash_attn_4":
        out = fa4_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                              max_seqlen_k=max_k, softmax_scale=scale, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some releases return (out, lse)
    if kernel == "flash_attn":
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)
    kwargs = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _kernel_inputs(query, key, value):
    """[1, H, S, D] q/k/v -> [S, H, D] views in the one 16-bit dtype flash kernels take, or None.

    Under autocast with fp32 weights, transformers' rotary embedding (computed in
    the residual stream's fp32) leaves q and k in fp32 while v comes out of its
    projection in the autocast dtype; the custom varlen ops are not on autocast's
    lists, so they are cast here, as transformers' own flash integration does.
    Without autocast the inputs must already share a 16-bit dtype; fp32 (no flash
    kernel) returns None and the exact per-document SDPA runs instead.
    """
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16, torch.bfloat16):
        dtype = query.dtype
    else:
        return None
    return tuple(t[0].transpose(0, 1).to(dtype) for t in (query, key, value))


def _per_document_sdpa(q, k, v, bounds: list[int], scale):
    """q/k/v: [1, H, S, D]; exact causal attention inside each [bounds[i], bounds[i+1])."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                    is_causal=True, scale=scale, enable_gqa=gqa,
                )
            )
    return torch.cat(outs, dim=2)


def _bounds_from_positions(position_ids: torch.Tensor) -> list[int] | None:
    """Segment starts where positions restart at 0 (one row); None if there is one segment."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten().tolist()
    if starts[:1] != [0] or len(starts) == 1:
        return None
    return starts + [pos.numel()]


def _segments_from_positions(position_ids: torch.Tensor, device: torch.device):
    """``(cu_seqlens, max_length)`` from position resets, or None; read once per ``position_ids`` tensor.

    Finding the resets needs the positions on the host: on CUDA a device
    synchronisation. Every decoder layer (and its recomputation in backward)
    receives the same ``position_ids`` tensor, so the answer is kept on that
    tensor and the device is asked once per forward instead of once per layer.
    """
    cached = getattr(position_ids, "_evotune_segments", None)
    if cached is not None and cached[0] == position_ids._version and cached[1] == device:
        return cached[2]
    bounds = _bounds_from_positions(position_ids)
    segments = None
    if bounds is not None:
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        segments = (cu, max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    position_ids._evotune_segments = (position_ids._version, device, segments)
    return segments


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    sp_group: dist.ProcessGroup | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, S, Hq, D].

    ``sp_group`` (sequence parallel): q/k/v hold this rank's chunk of the row and
    ``cu_seq_lens_*`` the whole row's boundaries; the attention runs on the whole
    sequence for heads / sp heads (evotune.parallel.ulysses).
    """
    if sp_group is not None and dist.get_world_size(sp_group) > 1:
        def whole_sequence(q, k, v):  # positions are a shard here and not needed: boundaries are cu_seqlens
            return varlen_attention_forward(
                module, q, k, v, attention_mask, scaling, dropout, cu_seq_lens_q, cu_seq_lens_k,
                max_length_q, max_length_k, **kwargs)[0]

        return sequence_parallel_attention(whole_sequence, query, key, value, sp_group), None
    if cu_seq_lens_q is None and position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1:
        segments = _segments_from_positions(position_ids, query.device)
        if segments is not None:
            cu_seq_lens_q = cu_seq_lens_k = segments[0]
            max_length_q = max_length_k = segments[1]
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            is_causal=attention_mask is None and query.shape[2] > 1 and query.shape[2] == key.shape[2],
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("varlen attention expects one packed row (batch dimension 1)")
    kernel_inputs = _kernel_inputs(query, key, value) if query.is_cuda else None
    if kernel_inputs is not None:
        cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
        out = _cuda_varlen(*kernel_inputs, cu_seq_lens_q, cu_k, max_length_q, max_length_k or max_length_q, scaling)
        return out.unsqueeze(0), None
    out = _per_document_sdpa(query, key, value, cu_seq_lens_q.tolist(), scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function under :data:`ATTN_NAME` (idempotent) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    return ATTN_NAME
