"""Packing against a plain per-token reference of InternEvo's rules, beyond what the goldens cover
(token 0, empty documents, segment splitting, many files); validation sets; packing errors."""

from __future__ import annotations

import numpy as np
import pytest

from evotune.data.ftdp import load_intern_repo_tokenized_dataset
from evotune.data.ftdp_write import write_bin
from evotune.data.packing import build_packed_dataset, build_valid_datasets
from evotune.errors import EvotuneError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))


def _random_docs(rng, n):
    docs = []
    for _ in range(n):
        d = rng.randint(0, 50, size=rng.choice([0, 1, 2, 5, 17, 40, 90]))
        d[rng.rand(len(d)) < 0.25] *= -1  # input-only tokens; some ids are 0
        docs.append(d.tolist())
    return docs


def _reference_packs(docs, kept_rows, P, L, one, type_id):
    """Literal rules of the README: shuffle, stream, cut, label, segment, position."""
    order = np.arange(len(kept_rows))
    np.random.RandomState(1024).shuffle(order)
    stream = []  # (token, doc, index in doc, doc length)
    for j in order:
        d = docs[kept_rows[j]]
        stream += [(t, j, i, len(d)) for i, t in enumerate(d)]
    packs = []
    for k in range(len(stream) // P):
        win = stream[k * P:(k + 1) * P]
        inputs = [abs(t) for t, *_ in win]
        labels = []
        for p, (t, j, i, n) in enumerate(win):
            if i == n - 1:
                lab = -100
            elif p == P - 1:
                lab = -100 if one else docs[kept_rows[j]][i + 1]
            else:
                lab = win[p + 1][0]
            labels.append(lab if lab > 0 else -100)
        if one:
            cu = list(range(0, P + 1, L))
        else:
            cu, p = [0], 0
            while p < P:  # fragments: maximal runs of one document
                q = p
                while q < P and win[q][1] == win[p][1]:
                    q += 1
                for s in range(p, q, L):
                    cu.append(min(s + L, q))
                p = q
        pos = [p - max(c for c in cu if c <= p) for p in range(P)]
        packs.append(dict(input_ids=inputs, labels=labels, cu_seqlens=cu, position_ids=pos, type_ids=[type_id] * P))
    return packs


@pytest.mark.parametrize("P,L,one,min_length", [(16, 16, False, 0), (24, 5, False, 0), (32, 8, True, 0),
                                                (64, 7, False, 3), (40, 10, True, 2), (7, 100, False, 0)])
def test_packs_match_reference(tmp_path, P, L, one, min_length):
    rng = np.random.RandomState(P + L)
    files = {"b/x.bin": _random_docs(rng, 30), "a/y.bin": _random_docs(rng, 25), "a/z/w.bin": _random_docs(rng, 12)}
    for rel, docs in files.items():
        write_bin(tmp_path / "d" / rel, docs)
    folder = load_intern_repo_tokenized_dataset(tmp_path / "d", min_length=min_length)
    ds = build_packed_dataset(folder, P, max_length_per_sample=L, pack_sample_into_one=one)
    expected = []
    for rel, type_id in [("a/y.bin", 0), ("a/z/w.bin", 0), ("b/x.bin", 1)]:
        docs = files[rel]
        kept = [i for i, d in enumerate(docs) if len(d) >= min_length]
        expected += _reference_packs(docs, kept, P, L, one, type_id)
    assert len(ds) == len(expected) > 5
    for i, ref in enumerate(expected):
        pack = ds[i]
        assert {k: v.tolist() for k, v in pack.items()} == ref, f"pack {i}"
    assert ds[-1]["input_ids"].tolist() == expected[-1]["input_ids"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_pickle_carries_paths_not_tokens(tmp_path):
    """DataLoader workers started with spawn receive a pickled dataset: it must stay small and map the cache."""
    import pickle

    write_bin(tmp_path / "d" / "x.bin", [list(range(1, 2001))] * 50)
    ds = build_packed_dataset(load_intern_repo_tokenized_dataset(tmp_path / "d"), 1000)
    blob = pickle.dumps(ds)
    assert len(blob) < 100_000  # the 100,000 tokens (400 kB) are not in it
    again = pickle.loads(blob)
    assert all(np.array_equal(again[i][k], ds[i][k]) for i in (0, 57, 99) for k in ds[0])


def test_config_dict_is_built(tmp_path):
    write_bin(tmp_path / "d" / "a" / "x.bin", [[1, 2, 3, 4, 5, 6]] * 4)
    from evotune.data.ftdp import load_intern_repo_tokenized_dataset as loader

    ds = build_packed_dataset(dict(type=loader, folder=str(tmp_path / "d"), min_length=0), packed_length=8, seed=7)
    assert (len(ds), ds.seed, ds.packed_length, ds.type_names, ds.max_token_id) == (3, 7, 8, ["a"], 6)


def test_pack_errors(tmp_path):
    write_bin(tmp_path / "d" / "x.bin", [[1, 2, 3]] * 8)
    folder = load_intern_repo_tokenized_dataset(tmp_path / "d")
    with pytest.raises(EvotuneError, match="multiple of max_length_per_sample"):
        build_packed_dataset(folder, 12, max_length_per_sample=5, pack_sample_into_one=True)
    with pytest.raises(EvotuneError, match="packed_length must be a positive"):
        build_packed_dataset(folder, 0)


def test_valid_datasets_one_per_folder(tmp_path):
    root = tmp_path / "valid"
    write_bin(root / "top.bin", [[1, 2, 3, 4]] * 3)
    write_bin(root / "en" / "a.bin", [[5, 6, 7, 8]] * 2)
    write_bin(root / "en" / "b.bin", [[9, 10, 11, 12]] * 2)
    write_bin(root / "en" / "deep" / "c.bin", [[13, 14, 15, 16]] * 4)
    sets = build_valid_datasets(root, packed_length=8)
    assert list(sets) == ["valid", "en", "en/deep"]
    assert [len(sets[k]) for k in sets] == [1, 2, 2]
    assert sorted(sets["en"][i]["input_ids"].tolist()[0] for i in range(2)) == [5, 9]
    with pytest.raises(EvotuneError, match=r"valid_folder .*valid: 12 tokens, fewer than one pack of 64"):
        build_valid_datasets(root, packed_length=64)
