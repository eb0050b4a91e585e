"""Varlen attention registered with ``transformers.AttentionInterface``.

Document boundaries reach the kernel as the forward keyword arguments that
transformers already passes through its models (``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``), so no model class is
patched. Because no mask function is registered under this name, transformers
builds no ``[S, S]`` mask either (that mask alone is 1 GB at 32k tokens).

Kernels, chosen per call by the device of the query:

* CUDA: flash-attn's ``flash_attn_varlen_func`` when installed, else PyTorch's
  ``torch.nn.attention.varlen.varlen_attn`` (its causal flag changed between
  releases, so the signature is read once at import).
* CPU: no varlen kernel has a CPU backward, so each document runs causal SDPA on
  its own and the outputs are concatenated: exact, and what the tests use.

Without ``cu_seq_lens_q`` (generation, plain evaluation) position resets in a
single row are turned into boundaries; otherwise plain causal SDPA runs.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

ATTN_NAME = "evotune_varlen"

try:  # pragma: no cover - only on machines with flash-attn
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch < 2.10
    varlen_attn = None
    _VARLEN_PARAMS = set()


def _cuda_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """q/k/v: [T, H, D] on CUDA. Returns [T, Hq, D]."""
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)
    if varlen_attn is None:
        raise RuntimeError("varlen attention on CUDA needs torch>=2.10 or flash-attn")
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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, S, Hq, D]."""
    if cu_seq_lens_q is None and position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1:
        bounds = _bounds_from_positions(position_ids)
        if bounds is not None:
            cu_seq_lens_q = cu_seq_lens_k = torch.tensor(bounds, dtype=torch.int32, device=query.device)
            max_length_q = max_length_k = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            is_causal=attention_mask is None and query.shape[2] > 1 and query.shape[2] == key.shape[2],
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("varlen attention expects one packed row (batch dimension 1)")
    if query.is_cuda:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [S, H, D]
        cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, cu_k, max_length_q, max_length_k or max_length_q, scaling)
        return out.unsqueeze(0), None
    out = _per_document_sdpa(query, key, value, cu_seq_lens_q.tolist(), scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function under :data:`ATTN_NAME` (idempotent) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    return ATTN_NAME
