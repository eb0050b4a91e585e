"""The throughput benchmark trains the same thing four ways (its timings are not asserted)."""

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

    def held_bytes(self):
        return 0


def test_evotune_padded_and_padding_free_transformers_paths_have_equal_losses(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "PeakMemory", _NoMemoryTracking)
    threads = torch.get_num_threads()
    try:
        results = bench.run(bench.parse_args(["--packed-length", "256", "--warmup", "1", "--steps", "2",
                                              "--threads", "1"]))
    finally:
        torch.set_num_threads(threads)
    by = {r["key"]: r for r in results}
    assert set(by) == {"a", "b", "c", "d"}
    assert by["a"]["name"] == "(a) evotune default"
    # same init, same documents, same objective: (a), (c) and (d) follow the same trajectory
    np.testing.assert_allclose(by["a"]["losses"], by["c"]["losses"], rtol=2e-5)
    np.testing.assert_allclose(by["a"]["losses"], by["d"]["losses"], rtol=2e-5)
    assert by["a"]["loss_check"] == by["d"]["loss_check"] == "ok"
    # (b) lets documents attend to each other: a different loss
    assert abs(by["b"]["losses"][0] - by["a"]["losses"][0]) > 1e-3
    # host reads per step of the loop's step on the CPU: attention's per-document bounds, once per layer
    # and recomputation (2 x 4 layers; the CUDA varlen kernel needs none), and nothing else: the loop's step
    # leaves the loss and the gradient norm on the device
    assert by["a"]["syncs"] == 8
    out = capsys.readouterr().out
    assert "a/d = " in out and "loss check: ok" in out


def test_padding_free_rows_never_train_across_documents(bench):
    """A document cut at a pack boundary continues in the next pack: its piece's first token is not a target
    there (the previous document's last token would predict it)."""
    packs = bench.make_packs(3, 256, 100, seed=2)
    continued = [pack[0] for pack in packs[1:]]
    assert any(d.target[0] for d in continued)  # the data has such a piece
    for pack in packs:
        batch = bench.padding_free_batch(pack, pin=False)
        starts = np.cumsum([0] + [len(d.ids) for d in pack[:-1]])
        assert (batch["labels"][0, starts] == -100).all()
        assert batch["num_items_in_batch"] == bench.packed_batch(pack, pin=False)["num_loss_tokens"]
