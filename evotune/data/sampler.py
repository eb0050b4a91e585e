"""InternEvo's global pack order, data-parallel aware and resumable mid-epoch.

The order (docs/data.md; InternEvo's ``StaticBatchSampler`` with the training
loop's epoch rollover): one ``np.random.RandomState(seed)`` is created once;
every epoch shuffles ``arange(num_packs)`` with it (its state carries over from
epoch to epoch), the permutation is truncated to a multiple of
``micro_num * dp_size``, data-parallel rank ``r`` takes every ``dp_size``-th
entry from ``r``, and each optimizer step takes ``micro_num`` consecutive
entries of that slice. Sequence-parallel ranks of one group pass the same
``dp_rank`` and so see the same packs.

``SequenceParallelSampler`` and ``InternRepoSampler`` (the names XTuner configs
use) are this one class.

State and resume: the state is ``(epoch, consumed)``, ``consumed`` being the
number of entries of the epoch's permutation taken by all ranks together (a
global position). Resuming rebuilds the epoch's permutation (it depends only on
``seed``, ``num_packs`` and the epoch, never on the data-parallel layout) and
continues at that position, truncating the rest of the epoch to a multiple of
the new ``micro_num * dp_size``:

* same ``dp_size * micro_num``, state saved at a step boundary: the exact
  stream of the uninterrupted run (unlike InternEvo, whose resume after the
  first epoch boundary replays epoch 0's order);
* another ``dp_size`` or ``micro_num``: the same global order from the same
  position; only the division among ranks changes, and the epoch's tail (fewer
  than ``micro_num * dp_size`` packs) may differ. Later epochs use the same
  permutations.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from evotune.errors import EvotuneError


class InternRepoSampler:
    """Yields this rank's pack indices forever, ``micro_num`` per optimizer step."""

    def __init__(self, dataset, shuffle: bool = True, seed: int | None = None, *, dp_size: int = 1,
                 dp_rank: int = 0, micro_num: int = 1):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise EvotuneError(f"sampler: dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
        if micro_num < 1:
            raise EvotuneError(f"sampler: micro_num (batch_size * accumulative_counts) must be >= 1, got {micro_num}")
        self.dataset = dataset
        self.num_packs = len(dataset)
        self.shuffle = bool(shuffle)
        self.seed = int(dataset.seed if seed is None else seed)
        self.dp_size, self.dp_rank, self.micro_num = int(dp_size), int(dp_rank), int(micro_num)
        self.global_batch = self.micro_num * self.dp_size
        self.steps_per_epoch = self.num_packs // self.global_batch
        if self.steps_per_epoch == 0:
            raise EvotuneError(
                f"the dataset has {self.num_packs} packs, fewer than one optimizer step needs "
                f"(micro_num {self.micro_num} x data-parallel size {self.dp_size} = {self.global_batch}); "
                "add data, lower max_length, accumulative_counts or the number of GPUs")
        self.mixing = getattr(dataset, "mixing", None)
        self.epoch = 0
        self._start = 0  # global position in the epoch's permutation where this rank's slice starts
        self._taken = 0  # indices this rank has yielded since _start
        self._rng = None
        self._rng_epochs = 0  # permutations drawn from _rng so far

    def __len__(self) -> int:
        """Indices per epoch on this rank (iteration itself never stops)."""
        return self.steps_per_epoch * self.micro_num

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global pack indices of ``epoch`` in order, before truncation and rank split."""
        population = self.mixing.epoch_packs(epoch) if self.mixing is not None else None
        n = self.num_packs if population is None else len(population)
        perm = np.arange(n)
        if self.shuffle:
            if self._rng is None or self._rng_epochs > epoch:
                self._rng, self._rng_epochs = np.random.RandomState(self.seed), 0
            while self._rng_epochs < epoch:  # replay earlier epochs: the state carries over
                self._rng.shuffle(np.arange(n))
                self._rng_epochs += 1
            self._rng.shuffle(perm)
            self._rng_epochs += 1
        return perm if population is None else population[perm]

    def __iter__(self) -> Iterator[int]:
        while True:
            order = self.epoch_order(self.epoch)
            rest = order[self._start:]
            mine = rest[:len(rest) // self.global_batch * self.global_batch][self.dp_rank::self.dp_size]
            while self._taken < len(mine):
                index = int(mine[self._taken])
                self._taken += 1
                yield index
            self.epoch += 1
            self._start = self._taken = 0

    def state_dict(self) -> dict:
        """Position after the indices yielded so far (all ranks assumed at the same step)."""
        return {"epoch": self.epoch, "consumed": self._start + self._taken * self.dp_size,
                "seed": self.seed, "num_packs": self.num_packs, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_packs", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise EvotuneError(
                    f"sampler state: saved with {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resume with the same data and seed (or start a new run)")
        self.epoch = int(state["epoch"])
        self._start = int(state["consumed"])
        self._taken = 0


SequenceParallelSampler = InternRepoSampler
