"""Per-type training loss, ``loss/<type>``, as InternEvo logs it.

The data types are the top-level sub-folders of the training folder
(``cn``, ``en``, ``code``, ...; ``dataset.type_names``), and every token of a
pack carries its type in ``type_ids``. ``loss/<type>`` is the plain token-mean
cross-entropy of the supervised tokens of that type over one optimizer step:
summed over micro-batches and over all ranks, then divided by the token count
(InternEvo's ``LossWithTypeId``: no label smoothing, no pack weighting, so it
differs from ``loss`` whenever packs have different numbers of targets).

The per-token losses come from the training forward itself:
:func:`evotune.model.loss.chunked_cross_entropy` returns detached per-group
sums when given ``group_ids`` (no second pass over the logits). Token counts
are known on the host from the collated batch, so they cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def loss_group_ids(micro_batch: dict) -> torch.Tensor:
    """Type id of every supervised token of a collated micro-batch, in ``loss_index`` order."""
    return micro_batch["type_ids"].reshape(-1).index_select(0, micro_batch["loss_index"])


class TypeLoss:
    """Accumulates per-type CE sums and token counts over a step; ``reduce()`` logs them.

    ``type_names``: the dataset's ``type_names`` (index = type id).
    """

    def __init__(self, type_names: Sequence[str], device: torch.device | str = "cpu"):
        self.type_names = list(type_names)
        self.device = torch.device(device)
        self.sums = torch.zeros(len(self.type_names), dtype=torch.float64, device=self.device)
        self.counts = np.zeros(len(self.type_names), dtype=np.int64)

    @property
    def num_groups(self) -> int:
        return len(self.type_names)

    def model_inputs(self, micro_batch: dict) -> dict:
        """Extra keyword arguments for the model's forward: ``loss_group_ids`` and ``num_groups``."""
        ids = loss_group_ids(micro_batch)
        if ids.numel() and int(ids.max()) >= self.num_groups:
            raise ValueError(f"type id {int(ids.max())} in the batch, but only {self.num_groups} type names "
                             f"({', '.join(self.type_names)})")
        return {"loss_group_ids": ids.to(self.device, non_blocking=True), "num_groups": self.num_groups}

    def add(self, group_sums: torch.Tensor, micro_batch: dict) -> None:
        """Add one micro-batch: the forward's per-type CE sums and the batch's token counts."""
        self.sums += group_sums.detach().to(self.sums)
        self.counts += np.bincount(loss_group_ids(micro_batch).numpy(), minlength=self.num_groups)

    def reduce(self, distributed: bool | None = None) -> dict[str, float]:
        """``{"loss/<type>": mean CE}`` over everything added since the last call, on all ranks.

        All ranks must call it (one all-reduce over the default group). Types
        without a supervised token in the window are left out (no 0/0).
        """
        stats = torch.cat([self.sums, torch.from_numpy(self.counts).to(self.sums)])
        if distributed if distributed is not None else (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(stats)
        sums, counts = stats.cpu().double().split(self.num_groups)
        self.sums.zero_()
        self.counts[:] = 0
        return {f"loss/{name}": float(s / c) for name, s, c in zip(self.type_names, sums, counts) if c > 0}
