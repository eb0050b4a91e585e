"""Cross-entropy over the LM head in chunks, never materialising full logits.

32k tokens x 92,544 vocab is 12 GB of fp32 logits. Here each chunk of tokens
goes through the head and the loss inside an activation checkpoint: forward
keeps only the chunk's scalar, backward recomputes one chunk's logits at a time,
so peak extra memory is one chunk of logits instead of all of them.

Only supervised tokens are passed in (the collate function already selected
them on the host), so prompt tokens of SFT data cost no head FLOPs at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 2048


def _chunk_loss(hidden, weight, bias, labels, token_weight, label_smoothing):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    return (ce * token_weight).sum()


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``sum_i token_weight[i] * CE(hidden[i] @ weight.T + bias, labels[i])``.

    hidden [N, H], weight [V, H], labels [N] (all valid targets), token_weight [N].
    Logits are computed in the weight's dtype and upcast to fp32 for the loss.
    """
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        args = (hidden[start:end], weight, bias, labels[start:end], token_weight[start:end], label_smoothing)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total
