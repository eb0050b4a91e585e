"""bench/lora_memory.py on a tiny InternLM2: the modes build what they say, the arithmetic and the report hold."""

from __future__ import annotations

import importlib
import math
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
        yield importlib.import_module("lora_memory")
    finally:
        sys.path.remove(str(REPO / "bench"))


def _tiny_args(bench, *extra):
    return bench.parse_args(["--shape", "tiny", "--tokens", "64", "--warmup", "1", "--steps", "1",
                             "--threads", "1", *extra])


def _measure(bench, monkeypatch, modes: tuple[str, ...], layers: int, *extra: str) -> list[dict]:
    """``measure`` of each mode in this process, memory untracked (the bench sets the thread count)."""
    monkeypatch.setattr(bench, "PeakMemory", _NoMemoryTracking)
    threads = torch.get_num_threads()
    try:
        args = _tiny_args(bench, *extra)
        return [bench.measure(mode, layers, args) for mode in modes]
    finally:
        torch.set_num_threads(threads)


def test_lora_and_qlora_steps_train_the_adapter_on_every_linear_layer_and_qlora_stores_4_bit(bench, monkeypatch):
    lora, qlora = _measure(bench, monkeypatch, ("lora", "qlora"), 2)
    s = bench.SHAPES["tiny"]
    H, inter = s["hidden_size"], s["intermediate_size"]
    kv = H // s["num_attention_heads"] * s["num_key_value_heads"]
    linears = [(H, H), (H, kv), (H, kv), (H, H), (H, inter), (H, inter), (inter, H)]  # q k v o gate up down
    r = bench.LORA["r"]
    for m in (lora, qlora):  # XTuner's adapter on InternLM2's wqkv: k and v share q's A (r x H)
        assert m["trainable"] == 2 * (sum(r * (i + o) for i, o in linears) - 2 * r * H)
        assert len(m["losses"]) == 2 and all(math.isfinite(x) for x in m["losses"])
        assert m["step_s"] == m["times"][1] and m["peak_bytes"] is None
    # the same model but its decoder's linear weights: 2 bytes each in bf16, half a byte in NF4
    linear_weights = 2 * sum(i * o for i, o in linears)
    assert lora["param_bytes"] - qlora["param_bytes"] == linear_weights * (2 - 0.5)
    # evotune's estimate on one process: 4-bit weights count their packed bytes, frozen bf16 ones their 2 bytes
    # (FSDP2 leaves a frozen base alone where nothing is split: no gathered copy)
    assert lora["state_bytes"] - qlora["state_bytes"] == linear_weights * (2 - 0.5)
    assert any("not compiled (bitsandbytes 4-bit layers" in n for n in qlora["notes"])


def test_qlora8_steps_bitsandbytes_adamw8bit_on_fsdp2_parameters(bench, monkeypatch):
    qlora, qlora8 = _measure(bench, monkeypatch, ("qlora", "qlora8"), 1)
    assert (qlora["optimizer"], qlora8["optimizer"]) == ("AdamW", "AdamW8bit")
    assert qlora8["trainable"] == qlora["trainable"] and qlora8["param_bytes"] == qlora["param_bytes"]
    # the same model and rows: the warm-up step's loss comes before any update, the next one after a different one
    assert qlora8["losses"][0] == qlora["losses"][0] and qlora8["losses"][1] != qlora["losses"][1]


def test_cpu_matmul_fp32_steps_the_same_model_to_bf16_rounding(bench, monkeypatch):
    (bf16,) = _measure(bench, monkeypatch, ("qlora",), 1)
    (fp32,) = _measure(bench, monkeypatch, ("qlora",), 1, "--cpu-matmul", "fp32")
    assert fp32["trainable"] == bf16["trainable"] and fp32["param_bytes"] == bf16["param_bytes"]
    assert bf16["routed_products"] is None and fp32["routed_products"]["aten.mm.default"] > 0
    assert fp32["routed_products"]["bitsandbytes.gemm_4bit.default"] > 0
    assert fp32["losses"] == pytest.approx(bf16["losses"], rel=1e-3)  # the same step, to bf16 rounding
    assert "--cpu-matmul" in _tiny_args(bench, "--cpu-matmul", "fp32").passthrough  # the measuring processes too


def test_cpu_matmul_fp32_on_a_gpu_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--cpu-matmul", "fp32"])
    assert "--cpu-matmul fp32 routes CPU products only" in capsys.readouterr().err


def test_a_measuring_process_reports_its_peak_rss_above_the_built_model(bench):
    args = _tiny_args(bench)
    got = bench._child("qlora", 1, args)
    assert "error" not in got, got
    assert got["mode"] == "qlora" and got["layers"] == 1 and got["tokens"] == 64
    assert got["peak_bytes"] > got["held_bytes"] >= 0  # the step allocates AdamW state and activations


def test_extrapolation_is_the_line_through_the_measured_depths(bench):
    value, per, fixed, residual = bench.extrapolate({1: 10.0, 2: 13.0}, 32)
    assert (value, per, fixed) == pytest.approx((103.0, 3.0, 7.0)) and residual is None
    value, per, fixed, residual = bench.extrapolate({2: 13.0, 1: 10.0, 4: 19.0}, 32)
    assert (value, per, fixed) == pytest.approx((103.0, 3.0, 7.0)) and residual == pytest.approx(0.0, abs=1e-9)
    assert bench.extrapolate({1: 10.0, 2: 13.0, 3: 17.0}, 32)[3] == pytest.approx(1 / 3)  # the best line misses 13 by 1/3


def test_full_finetune_is_evotunes_estimate_of_state_and_checkpointed_activations(bench):
    args = _tiny_args(bench)
    full = bench.full_finetune(args)
    s = bench.SHAPES["tiny"]
    assert full["state_bytes"] == 18 * full["params"]  # fp32 master, gradient, 2 moments + bf16 copy
    assert full["kept_bytes"] == s["hidden_size"] * 2 * 32 * 64  # each layer's bf16 input, 32 layers x 64 tokens
    assert full["peak_bytes"] == full["state_bytes"] + full["kept_bytes"] + full["recompute_bytes"]
    assert full["recompute_bytes"] > full["kept_bytes"] / 32  # one layer keeps more than its input without it


def test_report_labels_measured_extrapolated_and_computed_rows_and_gives_the_verdict(bench, capsys):
    args = _tiny_args(bench)
    gib = bench.GIB

    def row(mode, layers, peak, step):
        return {"mode": mode, "layers": layers, "peak_bytes": peak * gib, "held_bytes": peak * gib / 2,
                "state_bytes": peak * gib / 4, "step_s": step}

    results = [row("lora", 1, 4.0, 10.0), row("lora", 2, 4.5, 12.0),
               row("qlora", 1, 2.0, 20.0), row("qlora", 2, 2.25, 23.0),
               row("qlora8", 1, 1.5, 20.0), row("qlora8", 2, 1.7, 23.0)]
    full = {"peak_bytes": 100 * gib, "state_bytes": 99 * gib, "kept_bytes": 0.5 * gib, "recompute_bytes": 0.5 * gib}
    summary = bench.report(results, full, _tiny_args(bench, "--modes", "lora,qlora,qlora8"))
    out = capsys.readouterr().out
    # 32 layers: 4.0 + 31 * 0.5 = 19.5 GiB (LoRA), 2.0 + 31 * 0.25 = 9.75 GiB (QLoRA), step 20 + 31 * 3 s
    assert "| LoRA bf16 | 32 | 19.50 GiB |" in out and "| QLoRA NF4 | 32 | 9.75 GiB |" in out
    assert out.count("**extrapolated from 1, 2**") == 3 and out.count("| measured |") == 6
    assert "**computed**" in out
    assert summary["ratios"]["qlora/lora"] == pytest.approx(9.75 / 19.5)
    assert summary["ratios"]["lora/full"] == pytest.approx(0.195)
    assert "verdict: QLoRA NF4, 32 layers x 64 tokens: peak 9.75 GiB (extrapolated from 1, 2) vs the 8 GiB goal: " \
           "OVER; step 113.0 s on cpu" in out
    assert not summary["verdicts"]["qlora"]["fits"]
    # AdamW8bit: 1.5 + 31 * 0.2 = 7.7 GiB, its own verdict and its ratio to QLoRA with AdamW
    assert "verdict: QLoRA NF4 + AdamW8bit, 32 layers x 64 tokens: peak 7.70 GiB (extrapolated from 1, 2) vs the " \
           "8 GiB goal: UNDER" in out and summary["verdicts"]["qlora8"]["fits"]
    assert summary["ratios"]["qlora8/qlora"] == pytest.approx(7.7 / 9.75)
    assert summary["ratios"]["qlora8/qlora at 2 layers (measured)"] == pytest.approx(1.7 / 2.25)
    bench.report(results, full, _tiny_args(bench, "--budget-gib", "10"))
    assert "goal: UNDER" in capsys.readouterr().out
