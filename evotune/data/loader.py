"""Feed optimizer steps: sampler order in, collated micro-batches out.

The loop asks for one optimizer step at a time. Pack indices are drawn from the
sampler in the main thread, exactly when a step is prepared, and the sampler's
state is recorded right after: that state is what a checkpoint saved after the
step must hold, whatever is prefetched. Reading and collating the next step
happens in a background thread (packs are numpy slices of memory-mapped files,
so the GIL is mostly released), with pinned memory when training on CUDA.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Step:
    micro_batches: list[dict]
    sampler_state: dict  # the sampler's state once this step's packs are taken
    data_time: float  # seconds the loop waited for this step


class StepLoader:
    """Iterator of :class:`Step`; ``micro_num`` micro-batches of ``batch_size`` packs each."""

    def __init__(self, dataset, sampler, *, batch_size: int, micro_num: int,
                 collate: Callable[[list[dict]], dict], pin_memory: bool = False):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.micro_num = micro_num
        self.collate = collate
        self.pin_memory = pin_memory
        self._indices = iter(sampler)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._next: tuple[Future, dict] | None = None

    def _take(self) -> tuple[list[list[int]], dict]:
        groups = [[next(self._indices) for _ in range(self.batch_size)] for _ in range(self.micro_num)]
        return groups, self.sampler.state_dict()

    def _load(self, groups: list[list[int]]) -> list[dict]:
        batches = [self.collate([self.dataset[i] for i in g]) for g in groups]
        if self.pin_memory:
            batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                       for b in batches]
        return batches

    def _submit(self) -> tuple[Future, dict]:
        groups, state = self._take()
        return self._pool.submit(self._load, groups), state

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        start = time.perf_counter()
        pending, state = self._next if self._next is not None else self._submit()
        batches = pending.result()
        self._next = self._submit()
        return Step(batches, state, time.perf_counter() - start)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
