"""Validation loss per validation set, every ``evaluation_freq`` steps.

``valid_folder`` holds one set per leaf folder
(:func:`evotune.data.packing.build_valid_datasets`), packed like the training
data. The loss of a set is the mean cross-entropy over all its supervised
tokens (token-weighted, so it does not depend on how the set is packed or
split over ranks; InternEvo averages per-batch means instead). Packs are dealt
round-robin to data-parallel ranks; every rank runs the same number of
forwards (a rank short of packs repeats one with zero weight), because FSDP
forwards are collective. Sequence-parallel ranks shard each row as in training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from evotune.data.collate import model_inputs, packed_collate
from evotune.data.packing import build_valid_datasets
from evotune.parallel.ulysses import shard_row
from evotune.settings import DataSettings, EvalSettings
from evotune.train.evaluate import is_due


class Validator:
    """Packs ``eval.valid_folder`` as the training data is packed (same length, split, filter)."""

    def __init__(self, evaluation: EvalSettings, data: DataSettings, pmesh, device: torch.device):
        self.freq = evaluation.freq
        self.sets = build_valid_datasets(
            evaluation.valid_folder, data.max_length, max_length_per_sample=data.max_length_per_sample,
            pack_sample_into_one=data.pack_sample_into_one, min_length=data.min_length)
        self.pmesh = pmesh
        self.device = device

    def due(self, step: int, n_steps: int) -> bool:
        return is_due(step, n_steps, self.freq)

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """``{"val_loss/<set>": loss}``; must be called on every rank."""
        was_training = model.training
        model.eval()
        pm = self.pmesh
        sums = torch.zeros(2 * len(self.sets), dtype=torch.float64, device=self.device)
        for s, ds in enumerate(self.sets.values()):
            mine = list(range(pm.dp_rank, len(ds), pm.dp_size))
            rounds = -(-len(ds) // pm.dp_size)
            for r in range(rounds):
                real = r < len(mine)
                batch = shard_row(packed_collate([ds[mine[r] if real else 0]], "token"), pm.sp_rank, pm.sp_size)
                inputs = model_inputs(batch, self.device, pm.sp_group)
                inputs["loss_weight"] = inputs["loss_weight"] * float(real)
                sums[2 * s] += model(**inputs).double()
                sums[2 * s + 1] += batch["num_loss_tokens"] * float(real)
        if dist.is_initialized():
            dist.all_reduce(sums)
        model.train(was_training)
        return {f"val_loss/{name}": float(sums[2 * s] / max(float(sums[2 * s + 1]), 1.0))
                for s, name in enumerate(self.sets)}
