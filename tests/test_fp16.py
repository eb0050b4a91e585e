"""float16 compute with dynamic loss scaling (issue 14 part 4), on the CPU (autocast).

XTuner's ``AmpOptimWrapper(dtype='float16', loss_scale='dynamic')``: overflow
steps are skipped and counted in ``skipped_steps`` while the scale comes down,
and the scale is part of the checkpoint, so a resumed run is the same run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evotune.checkpoint import dcp
from evotune.train.loss_scale import LossScaler
from test_distributed import read_hf_weights, read_metrics, run_single, tiny_options

# 2**30: the first gradients overflow float16 (max 65504) until the scale has come down
FP16 = ["optim_wrapper.dtype='float16'", "optim_wrapper.loss_scale={'init_scale': 1073741824.0, 'growth_interval': 3}"]


def _run(tiny_llama_dir, small_folder, work, *extra, **overrides):
    opts = tiny_options(tiny_llama_dir, small_folder, **{"max_steps": 24, "save_steps": 12, **overrides})
    return run_single([*opts, *FP16, *extra], work)


@pytest.fixture(scope="module")
def fp16_run(tiny_llama_dir, small_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("fp16")
    summary = _run(tiny_llama_dir, small_folder, work)
    return work, summary, read_metrics(work)


def test_overflow_steps_are_skipped_counted_and_the_scale_comes_down(fp16_run):
    work, summary, records = fp16_run
    assert summary["steps"] == 24
    overflow = [r["overflow"] for r in records]
    n = overflow.index(False)
    assert n >= 6  # more than max_consecutive_skips=5 in a row: overflows are not divergence, the run went on
    assert [r["loss_scale"] for r in records[:n + 1]] == [2.0 ** (30 - i) for i in range(n + 1)]
    assert 0 < sum(overflow[n:]) < len(overflow[n:]) / 2  # later, the scale grows until it overflows again
    # the scale follows the rule: halve after an overflow, double after growth_interval=3 applied steps
    rule = LossScaler(init_scale=2.0 ** 30, growth_factor=2, backoff_factor=0.5, growth_interval=3)
    for r in records:
        assert r["loss_scale"] == rule.scale
        rule.update(r["overflow"])
    assert [r["skipped_steps"] for r in records] == list(np.cumsum(overflow))
    assert all(r["skipped"] == r["overflow"] and (r["grad_norm"] is None) == r["overflow"] for r in records)
    # a skipped step is not applied: the lr schedule does not move
    assert all(b["lr"] == a["lr"] for a, b in zip(records, records[1:]) if a["skipped"])
    assert records[-1]["loss"] < records[n]["loss"] - 0.5


def test_the_scale_is_in_the_checkpoint_and_a_resumed_run_is_the_same(fp16_run, tiny_llama_dir, small_folder,
                                                                         tmp_path):
    work, _, records = fp16_run
    saved = json.loads((work / "checkpoints" / "step_12" / dcp.TRAINER_STATE).read_text())
    assert saved["loss_scale"]["scale"] == records[12]["loss_scale"]
    assert saved["skipped_steps"] == records[11]["skipped_steps"]
    # stop at step 12, then resume to 24
    part = tmp_path / "part"
    _run(tiny_llama_dir, small_folder, part, max_steps=12)
    run_single([*tiny_options(tiny_llama_dir, small_folder, max_steps=24, save_steps=12), *FP16], part,
               resume="auto")
    resumed = read_metrics(part)
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for key in ("loss", "grad_norm", "lr", "loss_scale", "skipped_steps"):
        values = [[np.nan if r[key] is None else r[key] for r in run] for run in (resumed, records)]
        np.testing.assert_allclose(*values, rtol=1e-5, err_msg=key)
    a, b = read_hf_weights(part), read_hf_weights(work)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_loss_scaler_rules():
    s = LossScaler(init_scale=8, growth_factor=2, backoff_factor=0.5, growth_interval=2)
    for overflow, scale in [(True, 4), (False, 4), (False, 8), (True, 4), (False, 4)]:
        s.update(overflow)
        assert s.scale == scale
    static = LossScaler(init_scale=8, growth_factor=2, backoff_factor=0.5, growth_interval=1, dynamic=False)
    static.update(True)
    assert static.scale == 8
    g = torch.nn.Parameter(torch.zeros(3))
    g.grad = torch.full((3,), 16.0)
    s.unscale_([g])
    assert torch.equal(g.grad, torch.full((3,), 4.0))


def test_two_sharded_ranks_skip_the_same_steps_as_one(fp16_run, tiny_llama_dir, small_folder, tmp_path):
    """ZeRO-3 on 2 gloo ranks: the overflow test is the global grad norm over every shard, so the ranks
    skip together and the scale comes down as in the one-process run."""
    import os
    import subprocess
    import sys

    from test_distributed import REPO

    _, _, reference = fp16_run
    work = tmp_path / "w"
    # 2 ranks x accumulation 1 = the reference's 1 rank x accumulation 2 packs per step
    opts = tiny_options(tiny_llama_dir, small_folder, max_steps=24, save_steps=12, accumulative_counts=1)
    proc = subprocess.run(
        [sys.executable, "-m", "evotune.cli", "train", "tiny_llama_cpu", "--work-dir", str(work), "--seed", "0",
         "--device", "cpu", "--deepspeed", "deepspeed_zero3", "--cfg-options", *opts, *FP16],
        cwd=REPO, env={**os.environ, "NPROC_PER_NODE": "2"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu, FSDP2 zero3" in proc.stdout
    got = read_metrics(work)
    assert len(got) == len(reference) == 24
    # the same descent of the scale while the gradients overflow for sure (an overflow is decided by a
    # gradient within rounding of float16's limit near the first scale that works, and the reduction
    # order differs between the runs, so from there on each run finds its own scales)
    n = [r["overflow"] for r in reference].index(False)
    assert n >= 6
    for key in ("overflow", "loss_scale", "skipped_steps", "lr"):
        assert [r[key] for r in got[:n]] == [r[key] for r in reference[:n]], key
    np.testing.assert_allclose([r["loss"] for r in got[:n]], [r["loss"] for r in reference[:n]], rtol=1e-6)
    later = got[n:]
    assert 0 < sum(r["overflow"] for r in later) < len(later) / 2 and later[-1]["loss"] < got[n]["loss"] - 0.5
