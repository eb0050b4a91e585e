"""Feed optimizer steps: sampler order in, collated micro-batches out.

The loop asks for one optimizer step at a time. Pack indices are drawn from the
sampler in the main process, in order, and the sampler's state is recorded right
after each step's indices: that state is what a checkpoint saved after the step
must hold, however far ahead the loading runs. Reading and collating happens
off the main thread:

* ``num_workers=0``: one background thread prepares the next step (packs are
  numpy slices of memory-mapped files, so the GIL is mostly released);
* ``num_workers=N``: N worker processes (a ``torch.utils.data.DataLoader``
  over steps, forked so the memory maps and the collate function need no
  pickling) prepare up to ``2 N`` steps ahead, returned in order.

Both run the same collate code on the same indices, so the micro-batches are
identical bit for bit (tests/test_settings.py). Pinned memory when training on CUDA.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader


@dataclass
class Step:
    micro_batches: list[dict]
    sampler_state: dict  # the sampler's state once this step's packs are taken
    data_time: float  # seconds the loop waited for this step


class _StepData:
    """Map-style data whose "index" is a step's pack groups: what a DataLoader worker loads."""

    def __init__(self, loader: StepLoader):
        self.loader = loader

    def __getitem__(self, groups: list[list[int]]) -> list[dict]:
        return self.loader._load(groups, pin=False)


def _as_loaded(batches: list[dict]) -> list[dict]:
    """The DataLoader's collate step: nothing (its default would turn numpy fields into tensors)."""
    return batches


class StepLoader:
    """Iterator of :class:`Step`; ``micro_num`` micro-batches of ``batch_size`` packs each."""

    def __init__(self, dataset, sampler, *, batch_size: int, micro_num: int,
                 collate: Callable[[list[dict]], dict], pin_memory: bool = False, num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.micro_num = micro_num
        self.collate = collate
        self.pin_memory = pin_memory
        self._indices = iter(sampler)
        self._states: collections.deque[dict] = collections.deque()
        self._pool = self._next = self._workers = None
        if num_workers:
            self._workers = iter(DataLoader(_StepData(self), batch_size=None, sampler=self._groups(),
                                            collate_fn=_as_loaded, num_workers=num_workers, pin_memory=pin_memory,
                                            multiprocessing_context="fork"))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1)

    def _take(self) -> list[list[int]]:
        groups = [[next(self._indices) for _ in range(self.batch_size)] for _ in range(self.micro_num)]
        self._states.append(self.sampler.state_dict())
        return groups

    def _groups(self):
        while True:
            yield self._take()

    def _load(self, groups: list[list[int]], pin: bool) -> list[dict]:
        batches = [self.collate([self.dataset[i] for i in g]) for g in groups]
        if pin:
            batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                       for b in batches]
        return batches

    def _submit(self) -> Future:
        return self._pool.submit(self._load, self._take(), self.pin_memory)

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        start = time.perf_counter()
        if self._workers is not None:
            batches = next(self._workers)
        else:
            pending = self._next if self._next is not None else self._submit()
            batches = pending.result()
            self._next = self._submit()
        return Step(batches, self._states.popleft(), time.perf_counter() - start)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._workers = None  # the DataLoader iterator shuts its workers down when released
