"""The training data of one data-parallel rank, from the data settings.

Training (:mod:`evotune.train.loop`) and ``evotune batches``
(:mod:`evotune.data.batches`) both build dataset and sampler here, so the
batches command shows exactly what a rank trains on.
"""

from __future__ import annotations

from evotune.config import build
from evotune.data.sampler import SequenceParallelSampler
from evotune.errors import EvotuneError
from evotune.settings import DataSettings


def build_data(data: DataSettings, accumulative_counts: int, dp_size: int, dp_rank: int):
    """``(dataset, sampler)`` of data-parallel rank ``dp_rank``: ``train_dataset`` and
    ``train_dataloader.sampler`` with ``micro_num = batch_size * accumulative_counts`` packs per step."""
    if data.dataset is None:
        raise EvotuneError("the config has no train_dataset")
    dataset = build(data.dataset)
    spec = data.sampler or {"type": SequenceParallelSampler}
    return dataset, build(spec, dataset=dataset, dp_size=dp_size, dp_rank=dp_rank,
                          micro_num=data.batch_size * accumulative_counts)
