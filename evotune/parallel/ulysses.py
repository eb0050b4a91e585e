"""Ulysses sequence parallel: shard a packed row over the sp ranks, all-to-all around attention.

A packed row of ``L`` tokens is cut into ``sp`` contiguous chunks, one per rank
of a sequence-parallel group (:func:`shard_row`, on the host, after collate).
Everything outside attention (embeddings, norms, MLPs, the loss) is per token,
so each rank runs it on its own chunk. Attention needs the whole sequence, so
around it an all-to-all swaps the sequence shard for a head shard
(:func:`sequence_parallel_attention`): each rank then holds every token for
``heads / sp`` heads, runs the ordinary varlen kernel with the row's unchanged
``cu_seqlens``, and a second all-to-all gives the tokens back. Both all-to-alls
are differentiable (:class:`_AllToAll`), so a rank's loss reaches the keys and
values computed on the other ranks.

Loss: each rank keeps the supervised tokens of its chunk with the weights that
collate gave them for the whole row, so the sum of the ranks' losses is the
row's loss and the sum of their parameter gradients is its gradient. Data
parallel averages gradients over ranks, so a trainer that averages over all
``dp * sp`` ranks must multiply each rank's loss by ``sp`` (the loop does, see
docs/sequence-parallel.md).

Grouped-query attention: query heads must divide by ``sp`` (checked at start by
:func:`check_heads`). Key/value heads that do not divide by ``sp`` are repeated
to ``lcm(kv_heads, sp)`` heads before the all-to-all (:func:`replicate_kv_heads`),
which keeps every query head paired with a copy of its own key/value head; the
gradients of the copies add up in backward.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from evotune.errors import EvotuneError

# per-token tensors of a collated row ([1, L]), cut along the sequence
ROW_KEYS = ("input_ids", "position_ids", "labels", "type_ids")


def check_heads(num_heads: int, num_kv_heads: int, sp_size: int, where: str = "model") -> None:
    """Reject a model whose query heads cannot be split evenly over ``sp_size`` ranks."""
    if sp_size < 1:
        raise EvotuneError(f"sequence_parallel_size = {sp_size}: must be a positive integer")
    if num_heads % sp_size:
        raise EvotuneError(
            f"{where}: {num_heads} attention heads cannot be split over sequence_parallel_size = {sp_size} "
            f"(Ulysses gives each rank heads / sp heads); set sequence_parallel_size to a divisor of {num_heads}"
        )
    if num_heads % num_kv_heads:
        raise EvotuneError(f"{where}: {num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads")


def shard_row(batch: dict, sp_rank: int, sp_size: int) -> dict:
    """This rank's contiguous chunk of a collated row (see :func:`evotune.data.collate.packed_collate`).

    A row whose length does not divide by ``sp_size`` is first padded at the end
    with token 0 and ignored labels, as one extra document (``cu_seqlens`` gains
    a boundary), so padding attends only to itself and changes no loss or gradient.
    ``cu_seq_lens_*`` / ``max_length_*`` describe the whole (padded) row: the
    attention runs on the whole sequence. ``loss_index`` becomes local to the
    chunk, ``loss_weight`` keeps the row's weights. ``num_tokens`` /
    ``num_loss_tokens`` count this chunk's real tokens, so sums over all ranks
    stay exact; ``doc_lengths`` (used for FLOPs) is the whole row's.
    """
    if sp_size == 1:
        return batch
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank {sp_rank} out of range for sp_size {sp_size}")
    length = batch["input_ids"].shape[1]
    pad = -length % sp_size
    chunk = (length + pad) // sp_size
    start, end = sp_rank * chunk, (sp_rank + 1) * chunk
    out = dict(batch)
    for key in ROW_KEYS:
        if key in batch:
            row = batch[key]
            if pad:
                fill = {"position_ids": torch.arange(pad, dtype=row.dtype),
                        "labels": torch.full((pad,), -100, dtype=row.dtype)}.get(key, torch.zeros(pad, dtype=row.dtype))
                row = torch.cat([row, fill.unsqueeze(0)], dim=1)
            out[key] = row[:, start:end].contiguous()
    if pad:
        cu = batch["cu_seq_lens_q"]
        cu = torch.cat([cu, cu.new_tensor([length + pad])])
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = max(int(batch["max_length_q"]), pad)
    index = batch["loss_index"]
    lo, hi = (int(np.searchsorted(index.numpy(), b)) for b in (start, end))
    out["loss_index"] = index[lo:hi] - start
    out["loss_labels"] = batch["loss_labels"][lo:hi]
    out["loss_weight"] = batch["loss_weight"][lo:hi]
    out["num_tokens"] = max(0, min(end, length) - start)
    out["num_loss_tokens"] = hi - lo
    return out


class _AllToAll(torch.autograd.Function):
    """Split ``x`` along ``scatter_dim`` over the group, concatenate what arrives along ``gather_dim``.

    Its gradient is the same exchange with the two dimensions swapped.
    """

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()  # [size, ...]: piece i goes to rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] came from rank i
    return torch.cat(recv.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: ``x.shape[scatter_dim]`` must divide by the group size."""
    if x.shape[scatter_dim] % dist.get_world_size(group):
        raise ValueError(f"all_to_all: dimension {scatter_dim} of shape {tuple(x.shape)} does not split "
                         f"over {dist.get_world_size(group)} ranks")
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def replicate_kv_heads(kv: torch.Tensor, sp_size: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, lcm(Hkv, sp), S, D], each head repeated in place (no copy when sp divides Hkv)."""
    heads = kv.shape[1]
    repeat = math.lcm(heads, sp_size) // heads
    return kv if repeat == 1 else kv.repeat_interleave(repeat, dim=1)


def sequence_parallel_attention(attention, query, key, value, group, **kwargs):
    """Run ``attention`` (a transformers attention function body) on the whole sequence, heads / sp per rank.

    ``query`` [1, Hq, S/sp, D], ``key``/``value`` [1, Hkv, S/sp, D] (this rank's
    tokens) -> [1, S/sp, Hq, D]. ``attention(query, key, value, **kwargs)`` gets
    [1, Hq/sp, S, D] and [1, H'/sp, S, D] and returns [1, S, Hq/sp, D]; ``kwargs``
    (cu_seqlens etc.) must describe the whole row.
    """
    size = dist.get_world_size(group)
    if query.shape[1] % size:
        raise ValueError(f"{query.shape[1]} query heads do not split over {size} sequence-parallel ranks")
    key, value = replicate_kv_heads(key, size), replicate_kv_heads(value, size)
    query, key, value = (all_to_all(t, group, scatter_dim=1, gather_dim=2) for t in (query, key, value))
    out = attention(query, key, value, **kwargs)
    return all_to_all(out, group, scatter_dim=1, gather_dim=2)
