"""Activation checkpointing of a transformers model's decoder layers: full, selective or none.

* ``'full'``: each decoder layer keeps only its input; backward recomputes the
  whole layer (least memory, about a third more compute).
* ``'selective'``: each decoder layer keeps the outputs of its matrix products
  and of attention (the expensive ops) and recomputes only the cheap ones
  (norms, rotary embedding, activation, casts); almost the speed of ``'none'``
  for a fraction of its memory. It uses PyTorch's selective activation
  checkpointing (``create_selective_checkpoint_contexts``), op by op, the way
  torchtitan does.
* ``'none'``: every activation is kept (fastest when it fits).

Checkpointing goes through transformers' own switch
(``activation_checkpointing_enable``), which wraps each layer's ``forward`` so
that FSDP's hooks stay outside the recomputed region; nothing is patched.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from evotune.errors import EvotuneError

AC_MODES = ("full", "selective", "none")


@functools.cache
def _saved_ops() -> frozenset:
    """Operators whose outputs selective checkpointing keeps (those that exist in this build)."""
    import evotune.model.attention  # noqa: F401  (imports torch.nn.attention.varlen, registering its op)

    names = [
        ("aten", "mm"), ("aten", "addmm"), ("aten", "bmm"),
        ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_efficient_attention"),
        ("aten", "_scaled_dot_product_cudnn_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
        ("aten", "_flash_attention_forward"), ("aten", "_efficient_attention_forward"),
        ("torch_attn", "_varlen_attn"),  # torch.nn.attention.varlen.varlen_attn
        ("flash_attn", "_flash_attn_varlen_forward"), ("flash_attn", "_flash_attn_forward"),  # flash-attn >= 2.6
    ]
    ops = set()
    for namespace, name in names:
        packet = getattr(getattr(torch.ops, namespace), name, None) if hasattr(torch.ops, namespace) else None
        if packet is not None:
            ops.add(packet.default)
    return frozenset(ops)


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matrix-product and attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def normalize_mode(mode) -> str:
    """``True`` -> 'full', ``False``/``None`` -> 'none'; a name is checked."""
    if mode is True:
        return "full"
    if mode is False or mode is None:
        return "none"
    if mode not in AC_MODES:
        raise EvotuneError(f"activation_checkpointing={mode!r}: use one of {', '.join(AC_MODES)} (or True/False)")
    return mode


def set_activation_checkpointing(llm: nn.Module, mode) -> str:
    """Switch ``llm`` (a transformers ``PreTrainedModel``) to ``mode``; returns the normalised mode."""
    mode = normalize_mode(mode)
    enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
    disable = getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable
    if mode == "none":
        disable()
        return mode
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    enable(kwargs)
    return mode
