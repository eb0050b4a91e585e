"""bench/optimizer_memory.py: the adapter it steps is XTuner's, the state it counts is each optimizer's."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.test_bench_throughput import _NoMemoryTracking

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("optimizer_memory")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_the_adapter_is_xtuners_wqkv_adapter_at_7b_widths(bench):
    shapes = bench.adapter_shapes(2)
    assert sum(torch.Size(s).numel() for s in shapes) == 2 * 4_718_592  # 151.0 M at 32 layers
    assert shapes.count((64, 4096)) == 2 * 4  # one A for q/k/v, o, gate, up (down's A reads 14336)


def test_adamw_holds_8_bytes_a_parameter_and_adamw8bit_about_2(bench, monkeypatch):
    monkeypatch.setattr(bench, "PeakMemory", _NoMemoryTracking)
    threads = torch.get_num_threads()
    try:
        args = bench.parse_args(["--layers", "1", "--steps", "2", "--threads", "1"])
        adamw, adamw8bit = (bench.measure(name, 1, args) for name in ("adamw", "adamw8bit"))
    finally:
        torch.set_num_threads(threads)
    assert (adamw["class"], adamw8bit["class"]) == ("AdamW", "AdamW8bit") and adamw["fsdp"] and adamw8bit["fsdp"]
    assert adamw["params"] == adamw8bit["params"] == 4_718_592
    # two fp32 moments per parameter and a 4-byte step per tensor (fused AdamW keeps it as a tensor)
    assert adamw["state_bytes"] == 8 * adamw["params"] + 4 * adamw["tensors"]
    # two uint8 moments + one fp32 absmax per 256-element block each + two 256-entry maps per tensor
    blocks = sum(-(-torch.Size(s).numel() // 256) for s in bench.adapter_shapes(1))
    maps = 2 * 256 * 4 * adamw8bit["tensors"]
    assert adamw8bit["state_bytes"] == 2 * adamw8bit["params"] + 2 * 4 * blocks + maps
    assert adamw["checksum"] != adamw8bit["checksum"]  # both stepped the same start, differently
