"""Turn packs into one model input row, prepared entirely on the host.

Several packs of a micro-batch are concatenated into a single row (the varlen
kernel needs batch 1 and ``cu_seqlens``); the document boundaries, the maximum
document length, and the positions of supervised tokens are computed here with
numpy, so the training step never waits on the device to learn a shape.

Loss weights follow the reduction (docs/loss.md):
``'pack'``: each pack's supervised tokens weigh ``1 / (n_sup(pack) * n_packs)``,
so the micro-batch loss is the mean over packs of each pack's mean CE (InternEvo's
objective when one pack is one micro-batch; a pack with no target contributes 0);
``'token'``: weight 1, the loop divides by the step's global token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LOSS_REDUCTIONS = ("pack", "token")
# the keys of a collated batch that are keyword arguments of SupervisedFinetune.forward
MODEL_INPUTS = ("input_ids", "position_ids", "loss_index", "loss_labels", "loss_weight",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_collate(packs: Sequence[dict], loss_reduction: str = "pack") -> dict:
    """Collate packs (dicts of numpy arrays from ``PackedDataset``) into one row."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    input_ids = np.concatenate([p["input_ids"] for p in packs])
    labels = np.concatenate([p["labels"] for p in packs])
    position_ids = np.concatenate([p["position_ids"] for p in packs])
    type_ids = np.concatenate([p["type_ids"] for p in packs])
    cu, offset = [np.zeros(1, dtype=np.int64)], 0
    weights = []
    for p in packs:
        cu.append(np.asarray(p["cu_seqlens"][1:], dtype=np.int64) + offset)
        offset += len(p["input_ids"])
        n_sup = int((p["labels"] != -100).sum())
        w = 1.0 / (n_sup * len(packs)) if loss_reduction == "pack" and n_sup else 1.0
        weights.append(np.full(n_sup, w, dtype=np.float32))
    cu_seqlens = np.concatenate(cu)
    loss_index = np.flatnonzero(labels != -100)
    max_len = int(np.diff(cu_seqlens).max()) if len(cu_seqlens) > 1 else 0
    cu_t = torch.from_numpy(cu_seqlens.astype(np.int32))
    return {
        "input_ids": torch.from_numpy(input_ids).long().unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids).long().unsqueeze(0),
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t,
        "max_length_q": max_len,
        "max_length_k": max_len,
        "labels": torch.from_numpy(labels).long().unsqueeze(0),
        "type_ids": torch.from_numpy(type_ids).long().unsqueeze(0),
        "loss_index": torch.from_numpy(loss_index).long(),
        "loss_labels": torch.from_numpy(labels[loss_index]).long(),
        "loss_weight": torch.from_numpy(np.concatenate(weights)),
        "num_tokens": int(len(input_ids)),
        "num_loss_tokens": int(len(loss_index)),
        "doc_lengths": np.diff(cu_seqlens),
    }


def model_inputs(batch: dict, device: torch.device, sp_group=None) -> dict:
    """The forward's keyword arguments of a collated (and sharded) batch, tensors moved to ``device``;
    ``sp_group``: the sequence-parallel group (None when sp is 1)."""
    inputs = {k: batch[k].to(device, non_blocking=True) if isinstance(batch[k], torch.Tensor) else batch[k]
              for k in MODEL_INPUTS}
    if sp_group is not None:
        inputs["sp_group"] = sp_group
    return inputs
