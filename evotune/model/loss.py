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

With ``group_ids`` the same pass also sums the plain (unsmoothed, unweighted)
token cross-entropy per group, for per-type loss metrics (InternEvo's
``loss/<type>``): an ``index_add`` over values computed anyway, no second pass
over the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 2048
IGNORE_INDEX = -100


def _chunk_forward(hidden, weight, bias, labels, token_weight, label_smoothing, need_grad: bool,
                   group_ids=None, group_sums=None):
    """Weighted CE sum of one chunk and, if ``need_grad``, d(sum)/d(logits) in the logits' dtype.

    ``group_sums`` (if given) gets each token's plain CE ``lse - z_y`` added at its ``group_ids`` entry.

    The loss is computed in fp32 (or wider) whatever the matmul dtype (bf16 under autocast).
    ``CE = lse - (1 - eps) * z_y - eps * mean(z)`` with ``lse = m + log(sum(exp(z - m)))``,
    ``m = max(z)``; its gradient w.r.t. ``z`` is ``softmax(z) - (1 - eps) * onehot(y) - eps / V``.
    One [chunk, V] fp32 buffer holds z, then exp(z - m), then the gradient (in place).
    """
    logits = F.linear(hidden, weight, bias)
    dtype = logits.dtype
    z = logits.to(torch.promote_types(dtype, torch.float32))
    del logits
    w = token_weight.to(z.dtype) * (labels != IGNORE_INDEX)
    target = labels.clamp(min=0).unsqueeze(1)
    z_y = z.gather(1, target).squeeze(1)
    ce = -(1.0 - label_smoothing) * z_y
    if label_smoothing:
        ce = ce - label_smoothing * z.mean(dim=1)
    m = z.amax(dim=1, keepdim=True)
    p = z.sub_(m).exp_()  # unnormalised softmax; z is not needed any more
    total = p.sum(dim=1, keepdim=True)
    lse = (m + total.log()).squeeze(1)
    ce = ce + lse
    if group_sums is not None:
        group_sums.index_add_(0, group_ids, ((lse - z_y) * (labels != IGNORE_INDEX)).to(group_sums.dtype))
    loss = (ce * w).sum()
    if not need_grad:
        return loss, None
    p.mul_(w.unsqueeze(1) / total)
    if label_smoothing:
        p.sub_(w.unsqueeze(1) * (label_smoothing / p.shape[1]))
    p.scatter_add_(1, target, (w * -(1.0 - label_smoothing)).unsqueeze(1))
    return loss, p.to(dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients chunk by chunk in forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weight, chunk_tokens, label_smoothing,
                group_ids=None, group_sums=None):
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
                                     label_smoothing, need_grad=True,
                                     group_ids=None if group_ids is None else group_ids[start:end],
                                     group_sums=group_sums)
            total = total + loss
            if need_h:  # dL/dh = g @ W (same autocast dtype as the forward matmul)
                grad_hidden[start:end] = torch.matmul(g, weight)
            if need_w:  # dL/dW = g^T @ h, summed over chunks in fp32
                grad_weight += torch.matmul(g.t(), h)
            if need_b:
                grad_bias += g.sum(0)
            del g  # free this chunk's [chunk, V] gradient before the next chunk's logits exist
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
        return (*scaled, None, None, None, None, None, None)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    label_smoothing: float = 0.0,
    group_ids: torch.Tensor | None = None,
    num_groups: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sum_i token_weight[i] * CE(hidden[i] @ weight.T + bias, labels[i])``, a scalar (fp32 or wider).

    hidden [N, H], weight [V, H], labels [N] (targets; -100 contributes 0), token_weight [N]
    (data, not differentiated). Logits are computed in the matmul dtype (the weight's,
    or autocast's) and upcast to fp32 for the loss.

    With ``group_ids`` [N] (values in ``[0, num_groups)``) the result is ``(loss, group_sums)``:
    ``group_sums[g]`` is the sum of the plain CE (no label smoothing, no token weight, not
    differentiable) of the tokens of group ``g``.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    group_sums = hidden.new_zeros(num_groups, dtype=dtype) if group_ids is not None else None
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        total = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, token_weight.detach(),
                                                 chunk_tokens, float(label_smoothing), group_ids, group_sums)
    else:
        total = hidden.new_zeros((), dtype=dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            loss, _ = _chunk_forward(hidden[start:end], weight, bias, labels[start:end], token_weight[start:end],
                                     float(label_smoothing), need_grad=False,
                                     group_ids=None if group_ids is None else group_ids[start:end],
                                     group_sums=group_sums)
            total = total + loss
    return total if group_ids is None else (total, group_sums)
