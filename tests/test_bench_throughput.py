"""The throughput benchmark trains the same thing three ways (its timings are not asserted)."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("train_throughput")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_packs_are_full_and_both_layouts_hold_the_same_targets(bench):
    packs = bench.make_packs(3, 256, 100, seed=1)
    for pack in packs:
        assert sum(len(d.ids) for d in pack) == 256
        packed = bench.packed_batch(pack, pin=False)
        micro = bench.padded_micro_batches(pack, 256, pin=False)
        assert all(mb["padded_tokens"] <= 256 for mb in micro)
        # HF shifts labels by one inside its loss: its targets are labels[:, 1:]
        hf_targets = np.concatenate([mb["labels"][:, 1:][mb["labels"][:, 1:] != -100].numpy() for mb in micro])
        assert np.array_equal(np.sort(packed["loss_labels"].numpy()), np.sort(hf_targets))
        assert micro[0]["num_items_in_batch"] == packed["num_loss_tokens"]


class _NoMemoryTracking:
    """Stands in for ``PeakMemory``, whose CPU mode changes malloc settings for the whole process."""

    method = "not measured"
    peak_bytes = None

    def __init__(self, device):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_varlen_and_padded_transformers_paths_have_equal_losses(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "PeakMemory", _NoMemoryTracking)
    threads = torch.get_num_threads()
    try:
        results = bench.run(bench.parse_args(["--packed-length", "256", "--warmup", "1", "--steps", "2",
                                              "--threads", "1"]))
    finally:
        torch.set_num_threads(threads)
    by = {r["name"][1]: r for r in results}
    assert set(by) == {"a", "b", "c"}
    # same init, same documents, same objective: (a) and (c) follow the same trajectory
    np.testing.assert_allclose(by["a"]["losses"], by["c"]["losses"], rtol=2e-5)
    # (b) lets documents attend to each other: a different loss
    assert abs(by["b"]["losses"][0] - by["a"]["losses"][0]) > 1e-3
    assert "a/c = " in capsys.readouterr().out
