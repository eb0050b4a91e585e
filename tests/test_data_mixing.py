"""dataset_weights: shares per epoch, determinism, resume, and how names are matched."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from evotune.data.ftdp import load_intern_repo_tokenized_dataset
from evotune.data.ftdp_write import write_bin
from evotune.data.packing import build_packed_dataset
from evotune.data.sampler import InternRepoSampler
from evotune.errors import EvotuneError

P = 8  # tokens per pack; every document is one pack long, so a file of k documents has k packs
SIZES = {"en/books/b1.bin": 900, "en/books/b2.bin": 300, "en/web/w.bin": 600, "code/c.bin": 120, "zh/z.bin": 80}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("mix")
        mp.setenv("EVOTUNE_CACHE", str(root / "cache"))
        for i, (rel, n) in enumerate(SIZES.items()):
            write_bin(root / "d" / rel, [[i + 1] * P] * n)
        yield load_intern_repo_tokenized_dataset(root / "d")


def _source(ds, pack: int) -> str:
    return ds.folder.files[ds.file_of_pack(pack)].rel_path


def _epoch_shares(ds, groups, dp=2, m=3):
    """Share of each group among the packs all ranks train on in epoch 0."""
    counts, total = Counter(), 0
    for rank in range(dp):
        s = InternRepoSampler(ds, dp_size=dp, dp_rank=rank, micro_num=m)
        stream = iter(s)
        for _ in range(len(s)):
            rel = _source(ds, next(stream))
            counts[next(g for g, prefixes in groups.items() if rel.startswith(prefixes))] += 1
            total += 1
    return {g: counts[g] / total for g in groups}


def test_shares_follow_the_weights_within_one_percent(folder):
    weights = {"books": 3, "en/web": 1, "code": 4, "zh": 2}  # code (120 packs) up-sampled, books down
    ds = build_packed_dataset(folder, P, dataset_weights=weights)
    shares = _epoch_shares(ds, {"books": "en/books/", "en/web": "en/web/", "code": "code/", "zh": "zh/"})
    for name, w in weights.items():
        assert abs(shares[name] - w / 10) < 0.01, (name, shares[name])
    assert len(ds) == sum(SIZES.values())  # an epoch keeps the unweighted number of packs


def test_deepest_name_wins_and_weight_zero_leaves_data_out(folder):
    ds = build_packed_dataset(folder, P, dataset_weights={"en": 1, "en/books/b1.bin": 1, "code": 0, "zh": 0})
    shares = _epoch_shares(ds, {"b1": "en/books/b1", "en": "en/", "code": "code/", "zh": "zh/"})
    assert abs(shares["b1"] - 0.5) < 0.01 and abs(shares["en"] - 0.5) < 0.01
    assert shares["code"] == shares["zh"] == 0


def test_deterministic_and_resumable(folder):
    weights = {"books": 1, "web": 1, "code": 1, "zh": 1}
    ds = build_packed_dataset(folder, P, dataset_weights=weights, seed=3)
    ds_again = build_packed_dataset(folder, P, dataset_weights=weights, seed=3)
    assert np.array_equal(ds.mixing.epoch_packs(1), ds_again.mixing.epoch_packs(1))
    assert not np.array_equal(ds.mixing.epoch_packs(0), ds.mixing.epoch_packs(1))  # other draws per epoch
    s = InternRepoSampler(ds, micro_num=4, dp_size=2, dp_rank=1)
    stream = iter(s)
    full = [next(stream) for _ in range(4 * (s.steps_per_epoch + 30))]  # into epoch 1
    cut = 4 * (s.steps_per_epoch + 10)
    s2 = InternRepoSampler(ds_again, micro_num=4, dp_size=2, dp_rank=1)
    stream2 = iter(s2)
    for _ in range(cut):
        next(stream2)
    state = s2.state_dict()
    s3 = InternRepoSampler(ds_again, micro_num=4, dp_size=2, dp_rank=1)
    s3.load_state_dict(state)
    stream3 = iter(s3)
    assert [next(stream3) for _ in range(len(full) - cut)] == full[cut:]


@pytest.mark.parametrize("weights,message", [
    ({"books": 1, "web": 1, "code": 1}, r"zh/z\.bin is under no named sub-dataset; add its folder \('zh'\)"),
    ({"bokks": 1, "web": 1, "code": 1, "zh": 1}, r"name 'bokks' matches no folder .*did you mean 'books'"),
    ({"books": -1, "web": 1}, r"dataset_weights\['books'\] = -1: a weight is a number >= 0"),
    ({"en": 0, "code": 0, "zh": 0}, "all weights are 0"),
    ({"en/books": 1, "books": 2, "en": 1, "code": 1, "zh": 1}, "'books' and another name both mean 'en/books'"),
])
def test_weight_errors(folder, weights, message):
    with pytest.raises(EvotuneError, match=message):
        build_packed_dataset(folder, P, dataset_weights=weights)


def test_ambiguous_base_name(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))
    write_bin(tmp_path / "d" / "a" / "web" / "x.bin", [[1] * P] * 4)
    write_bin(tmp_path / "d" / "b" / "web" / "y.bin", [[2] * P] * 4)
    folder = load_intern_repo_tokenized_dataset(tmp_path / "d")
    with pytest.raises(EvotuneError, match="name 'web' matches several folders \\(a/web, b/web\\)"):
        build_packed_dataset(folder, P, dataset_weights={"web": 1})
