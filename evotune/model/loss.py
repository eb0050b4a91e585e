"""Cross-entropy over the LM head in chunks, never materialising full logits.

32k tokens x 92,544 vocab is 12 GB of fp32 logits. Here the tokens go through
the head and the loss one chunk at a time, and the gradients of that chunk
(w.r.t. the hidden states, the head weight and bias) are computed right away,
in the forward pass: only the chunk's logits exist at any moment, and the
backward pass has nothing left to do but scale the stored gradients by the
incoming scalar. Compared with checkpointing each chunk and recomputing its
logits in backward, this saves one head matrix product per token (a quarter of
the head's work) at the same peak memory.

Only supervised tokens are passed in (the collate function already selected
them on the host), so prompt tokens of SFT data cost no head FLOPs at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 2048
IGNORE_INDEX = -100


def _chunk_forward(hidden, weight, bias, labels, token_weight, label_smoothing, need_grad: bool):
    """Weighted CE sum of one chunk and, if ``need_grad``, d(sum)/d(logits) in the logits' dtype.

    The loss is computed in fp32 (or wider) whatever the matmul dtype (bf16 under autocast).
    ``CE = lse - (1 - eps) * z_y - eps * mean(z)``; its gradient w.r.t. ``z`` is
    ``softmax(z) - (1 - eps) * onehot(y) - eps / V``.
    """
    logits = F.linear(hidden, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != IGNORE_INDEX
    w = token_weight.to(z.dtype) * valid
    target = labels.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)
    ce = lse - (1.0 - label_smoothing) * z.gather(1, target).squeeze(1)
    if label_smoothing:
        ce = ce - label_smoothing * z.mean(dim=1)
    loss = (ce * w).sum()
    if not need_grad:
        return loss, None
    grad = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: z (or logits) is not needed any more
    if label_smoothing:
        grad.sub_(label_smoothing / z.shape[1])
    grad.scatter_add_(1, target, torch.full_like(target, -(1.0 - label_smoothing), dtype=grad.dtype))
    grad.mul_(w.unsqueeze(1))
    return loss, grad.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients chunk by chunk in forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weight, chunk_tokens, label_smoothing):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h = hidden[start:end]
            loss, g = _chunk_forward(h, weight, bias, labels[start:end], token_weight[start:end],
                                     label_smoothing, need_grad=True)
            total = total + loss
            if need_h:  # dL/dh = g @ W (same autocast dtype as the forward matmul)
                grad_hidden[start:end] = torch.matmul(g, weight)
            if need_w:  # dL/dW = g^T @ h, summed over chunks in fp32
                grad_weight += torch.matmul(g.t(), h)
            if need_b:
                grad_bias += g.sum(0)
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # the stored gradients are this call's own buffers: scale them in place, no copy
        # (a second backward with retain_graph=True fails autograd's version check instead of double-scaling)
        scaled = tuple(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors)
        return (*scaled, None, None, None, None)


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
    """``sum_i token_weight[i] * CE(hidden[i] @ weight.T + bias, labels[i])``, a scalar (fp32 or wider).

    hidden [N, H], weight [V, H], labels [N] (targets; -100 contributes 0), token_weight [N]
    (data, not differentiated). Logits are computed in the matmul dtype (the weight's,
    or autocast's) and upcast to fp32 for the loss.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, token_weight.detach(),
                                                chunk_tokens, float(label_smoothing))
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        loss, _ = _chunk_forward(hidden[start:end], weight, bias, labels[start:end], token_weight[start:end],
                                 float(label_smoothing), need_grad=False)
        total = total + loss
    return total
