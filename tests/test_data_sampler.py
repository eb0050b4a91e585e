"""The sampler's order, epoch rollover and mid-epoch resume (same and different data-parallel layouts)."""

from __future__ import annotations

import numpy as np
import pytest

from evotune.data.sampler import InternRepoSampler, SequenceParallelSampler
from evotune.errors import EvotuneError


class Packs:
    """Stands in for a PackedDataset: the sampler only needs its length, seed and mixing."""

    mixing = None

    def __init__(self, n: int, seed: int = 1024):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n


def _steps(sampler, n_steps, stream=None):
    """Take ``n_steps`` steps the way the trainer does; returns (steps, state after each)."""
    stream = stream if stream is not None else iter(sampler)
    steps, states = [], []
    for _ in range(n_steps):
        steps.append([next(stream) for _ in range(sampler.micro_num)])
        states.append(sampler.state_dict())
    return steps, states


def _expected(n, seed, dp, m, rank, epochs):
    """README rule 8, written out: one RandomState for all epochs, truncate, r::dp, m per step."""
    rng = np.random.RandomState(seed)
    steps = []
    for _ in range(epochs):
        perm = np.arange(n)
        rng.shuffle(perm)
        mine = perm[:n // (m * dp) * (m * dp)][rank::dp]
        steps += [mine[i:i + m].tolist() for i in range(0, len(mine), m)]
    return steps


@pytest.mark.parametrize("n,dp,m,seed", [(23, 1, 1, 1024), (23, 2, 3, 7), (50, 4, 2, 0)])
def test_order_over_epochs(n, dp, m, seed):
    for rank in range(dp):
        s = SequenceParallelSampler(Packs(n), seed=seed, dp_size=dp, dp_rank=rank, micro_num=m)
        assert s.steps_per_epoch == n // (dp * m) and len(s) == s.steps_per_epoch * m
        steps, _ = _steps(s, 3 * s.steps_per_epoch)
        assert steps == _expected(n, seed, dp, m, rank, 3)


def test_default_seed_is_the_datasets_and_no_shuffle_is_in_order():
    s = InternRepoSampler(Packs(10, seed=5), micro_num=2)
    assert _steps(s, 5)[0] == _expected(10, 5, 1, 2, 0, 1)
    s = InternRepoSampler(Packs(10), shuffle=False, micro_num=3, dp_size=1)
    assert _steps(s, 4)[0] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


@pytest.mark.parametrize("cut", [1, 3, 6, 7, 13, 20])  # steps_per_epoch = 7: inside, at and across epochs
def test_resume_mid_epoch_is_exact(cut):
    n, dp, m = 47, 2, 3
    for rank in range(dp):
        run = InternRepoSampler(Packs(n), dp_size=dp, dp_rank=rank, micro_num=m)
        steps, states = _steps(run, 24)
        resumed = InternRepoSampler(Packs(n), dp_size=dp, dp_rank=rank, micro_num=m)
        resumed.load_state_dict(states[cut - 1])
        assert _steps(resumed, 24 - cut)[0] == steps[cut:]
        assert resumed.epoch == run.epoch


def test_resume_at_another_data_parallel_size_continues_the_global_order():
    n, seed = 60, 1024
    perm_rng = np.random.RandomState(seed)
    perms = []
    for _ in range(2):
        p = np.arange(n)
        perm_rng.shuffle(p)
        perms.append(p)
    old = InternRepoSampler(Packs(n), dp_size=2, dp_rank=0, micro_num=2)
    _, states = _steps(old, 5)  # 5 steps x 2 packs x 2 ranks = 20 packs of epoch 0
    assert states[-1] == {"epoch": 0, "consumed": 20, "seed": seed, "num_packs": n, "shuffle": True}
    taken = []
    for rank in range(3):
        new = InternRepoSampler(Packs(n), dp_size=3, dp_rank=rank, micro_num=1)
        new.load_state_dict(states[-1])
        taken.append(_steps(new, 14)[0])
    # rank r's step i is the global position 20 + 3 i + r: the global order goes on where it stopped
    merged = [taken[r][i][0] for i in range(13) for r in range(3)]
    assert merged == perms[0][20:59].tolist()
    assert [taken[r][13][0] for r in range(3)] == perms[1][:3].tolist()  # then epoch 1, same permutation


def test_errors():
    with pytest.raises(EvotuneError, match=r"6 packs, fewer than one optimizer step needs \(micro_num 4 x "
                                           r"data-parallel size 2 = 8\)"):
        InternRepoSampler(Packs(6), dp_size=2, micro_num=4)
    with pytest.raises(EvotuneError, match="dp_rank 2 must lie in"):
        InternRepoSampler(Packs(6), dp_size=2, dp_rank=2)
    s = InternRepoSampler(Packs(10))
    with pytest.raises(EvotuneError, match="saved with num_packs=11 but this run has 10"):
        s.load_state_dict({"epoch": 0, "consumed": 0, "seed": 1024, "num_packs": 11, "shuffle": True})
