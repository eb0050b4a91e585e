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
* ``'auto'`` (the default): on CUDA, the fastest of the three whose activations
  fit in the GPU's free memory, sized from what one decoder layer of this model
  measurably keeps per token (:func:`measure_activation_bytes`), the tokens of
  a micro-batch and the memory the weights, gradients and optimizer state take
  (:func:`choose_mode`, a pure function of those numbers; the decision and its
  reason are printed). On the CPU it means ``'full'``, the default before
  ``'auto'`` existed: there is no device memory to size against, and CPU runs
  are the small ones.

Checkpointing goes through transformers' own switch
(``activation_checkpointing_enable``), which wraps each layer's ``forward`` so
that FSDP's hooks stay outside the recomputed region; nothing is patched.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from evotune.errors import EvotuneError
from evotune.model.layers import decoder_layers

AC_MODES = ("full", "selective", "none")
AUTO = "auto"
RESERVE_FRACTION = 0.2  # of the GPU's total memory, kept for transients, the loss chunk and fragmentation


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
    """``True`` -> 'full', ``False``/``None`` -> 'none'; a name ('auto' included) is checked."""
    if mode is True:
        return "full"
    if mode is False or mode is None:
        return "none"
    if mode not in AC_MODES + (AUTO,):
        raise EvotuneError(f"activation_checkpointing={mode!r}: use one of {', '.join(AC_MODES + (AUTO,))} "
                           "(or True/False)")
    return mode


def set_activation_checkpointing(llm: nn.Module, mode) -> str:
    """Switch ``llm`` (a transformers ``PreTrainedModel``) to ``mode``; returns the normalised mode."""
    mode = normalize_mode(mode)
    if mode == AUTO:
        raise EvotuneError("activation_checkpointing='auto' is resolved by choose_mode before it is applied")
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


@dataclass(frozen=True)
class Choice:
    mode: str
    reason: str


def choose_mode(per_token_layer: dict, layers: int, tokens: int, free_bytes: int, total_bytes: int,
                state_bytes: int, reserve_fraction: float = RESERVE_FRACTION) -> Choice:
    """The fastest checkpointing mode whose activations fit, and why.

    ``per_token_layer``: bytes one decoder layer keeps per token for each of
    'none', 'selective', 'full' (:func:`measure_activation_bytes`); ``tokens``:
    tokens of one micro-batch on this rank; ``free_bytes`` / ``total_bytes``:
    the GPU's free and total memory before the model is moved onto it;
    ``state_bytes``: what the weights, gradients and optimizer state will take
    there. The budget is ``free - reserve_fraction * total - state``; 'none' is
    taken when its activations fit, else 'selective', else 'full' (which is also
    the answer, with a warning, when even that does not fit).
    """
    budget = free_bytes - reserve_fraction * total_bytes - state_bytes
    need = {mode: per_token_layer[mode] * layers * tokens for mode in ("none", "selective", "full")}
    sizes = ", ".join(f"{mode} {need[mode] / 2**30:.1f} GiB" for mode in need)
    where = (f"activations of {layers} layers x {tokens} tokens: {sizes}; budget {budget / 2**30:.1f} GiB = "
             f"{free_bytes / 2**30:.1f} GiB free - {reserve_fraction:.0%} of {total_bytes / 2**30:.1f} GiB reserve "
             f"- {state_bytes / 2**30:.1f} GiB weights/gradients/optimizer state")
    for mode in ("none", "selective", "full"):
        if need[mode] <= budget:
            return Choice(mode, f"the fastest that fits ({where})")
    return Choice("full", f"even full checkpointing may not fit ({where}); lower max_length or shard more "
                          "(--deepspeed deepspeed_zero3, more GPUs)")


class _SavedBytes(TorchDispatchMode):
    """Keeps the outputs of the operators selective checkpointing keeps (alive, so that no
    address is reused while the forward runs)."""

    def __init__(self):
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _saved_ops():
            self.kept.extend(t for t in (out if isinstance(out, (tuple, list)) else (out,))
                             if isinstance(t, torch.Tensor))
        return out


def _storage_bytes(tensors, exclude: set) -> int:
    """Bytes of the distinct storages of ``tensors`` (all alive), except those at ``exclude``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in storages.items() if ptr not in exclude)


def measure_activation_bytes(llm: nn.Module, dtype: torch.dtype, tokens: int = 64) -> dict:
    """Bytes per token one decoder layer keeps for backward under each mode, measured on the CPU.

    A copy of the first decoder layer, in ``dtype`` (the compute dtype: FSDP's
    mixed precision casts the weights, so activations are in that dtype too),
    runs forward on ``tokens`` tokens of one document. 'none': every tensor
    autograd saves (saved-tensor hooks, each storage once, parameters
    excluded); 'selective': the outputs of the operators the selective policy
    keeps, plus the layer input that the checkpoint keeps; 'full': the layer
    input only.
    """
    layer = copy.deepcopy(decoder_layers(llm, "activation_checkpointing='auto' measures one")[0]).to("cpu")
    if all(p.is_floating_point() for p in layer.parameters()):
        layer = layer.to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    hidden = torch.randn(1, tokens, llm.config.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens).unsqueeze(0)
    rotary = next((m for name, m in llm.named_modules() if name.endswith("rotary_emb")), None)
    extra = {}
    if rotary is not None:
        rotary = copy.deepcopy(rotary).to("cpu")
        extra["position_embeddings"] = tuple(t.to(dtype) for t in rotary(hidden, positions))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _SavedBytes() as kept:
        out = layer(hidden, position_ids=positions, attention_mask=None, **extra)
    layer_input = hidden.numel() * hidden.element_size()
    measured = {"none": _storage_bytes(saved, weights) / tokens,
                "selective": (_storage_bytes(kept.kept, weights) + layer_input) / tokens,
                "full": layer_input / tokens}
    del out
    return measured
