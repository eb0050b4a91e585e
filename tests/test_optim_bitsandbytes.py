"""bitsandbytes optimizers (evotune/train/optim.py): stepping FSDP2's DTensor parameters, checkpoints, refusal.

A 2-process run without ``--deepspeed`` is FSDP2 replicate: DTensor parameters, whole on every rank, the
case :class:`evotune.train.optim._LocalTensorStep` serves (one GPU is the same case with one rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from evotune.errors import EvotuneError
from evotune.train.optim import check_optimizer, moment_bytes
from tests.test_lora import _adapter, _metrics, _stopped_after_step_2, _train_cli, lora_config_file

bnb = pytest.importorskip("bitsandbytes")

# min_8bit_size=16: the tiny model's adapters (256 elements) get 8-bit state too (bitsandbytes' default: 4096)
ADAMW8BIT = "dict(type=AdamW8bit, lr=lr, betas=(0.9, 0.95), weight_decay=0.01, min_8bit_size=16)"


def _config(tmp: Path, model: str, data: str, accum: int) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = lora_config_file(tmp, model, data, optim=ADAMW8BIT, lr=3e-2, steps=4, accum=accum)
    Path(cfg).write_text("from bitsandbytes.optim import AdamW8bit\n" + Path(cfg).read_text() + "save_steps = 2\n")
    return cfg


@pytest.fixture(scope="module")
def adamw8bit_runs(tmp_path_factory, tiny_llama_dir, small_folder):
    """Uninterrupted 4-step LoRA runs with AdamW8bit, checkpoints at 2 and 4: one process with accumulation
    2 ("one"), two gloo ranks (replicate) with accumulation 1 ("two"). Returns (dir, config of one, of two)."""
    tmp = tmp_path_factory.mktemp("adamw8bit")
    one = _config(tmp / "cfg_one", tiny_llama_dir, small_folder, accum=2)
    two = _config(tmp / "cfg_two", tiny_llama_dir, small_folder, accum=1)
    _train_cli(one, tmp / "one")
    _train_cli(two, tmp / "two", nproc=2)
    return tmp, one, two


def test_two_replicated_ranks_equal_one_rank_with_twice_the_accumulation(adamw8bit_runs):
    tmp, _, _ = adamw8bit_runs
    for a, b in zip(_metrics(tmp / "one"), _metrics(tmp / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    ref, got = _adapter(tmp / "one"), _adapter(tmp / "two")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)


def test_the_checkpoint_holds_8bit_state_keyed_by_the_adapters_names(adamw8bit_runs):
    tmp, _, _ = adamw8bit_runs
    for run in ("one", "two"):
        meta = FileSystemReader(str(tmp / run / "checkpoints" / "step_4")).read_metadata().state_dict_metadata
        adapters = {k[len("model."):] for k in meta if k.startswith("model.")}
        assert adapters and all("lora_" in k for k in adapters)
        for name in adapters:  # AdamW8bit's two moments, one byte per element (bitsandbytes nests them)
            moments = [meta[k] for k in meta if k.startswith(f"optimizer.state.{name}.")
                       and k.endswith((".state1", ".state2"))]
            assert len(moments) == 2
            assert all(m.properties.dtype == torch.uint8 and m.size == meta[f"model.{name}"].size for m in moments)
        assert not any(k.endswith(("exp_avg", "exp_avg_sq")) for k in meta)


def test_resume_is_bitwise_and_moves_between_world_sizes(adamw8bit_runs, tmp_path):
    tmp, one, two = adamw8bit_runs
    work = _stopped_after_step_2(tmp / "two", tmp_path / "resumed")
    _train_cli(two, work, "--resume", "auto", nproc=2)
    a, b = _adapter(work), _adapter(tmp / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["loss"]) for r in _metrics(work)] == [(r["step"], r["loss"]) for r in _metrics(tmp / "two")]
    # the 2-rank checkpoint of step 2 continues on one process with accumulation 2
    moved = _stopped_after_step_2(tmp / "two", tmp_path / "moved")
    _train_cli(one, moved, "--resume", "auto")
    got, ref = _adapter(moved), _adapter(tmp / "one")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)


def test_sharded_presets_refuse_a_bitsandbytes_optimizer_at_start(adamw8bit_runs, tmp_path):
    _, _, two = adamw8bit_runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"}
    out = subprocess.run([sys.executable, "-m", "evotune.cli", "train", two, "--work-dir", str(tmp_path / "w"),
                          "--device", "cpu", "--deepspeed", "deepspeed_zero2"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert ("optim_wrapper.optimizer.type=bitsandbytes.optim.adamw.AdamW8bit: bitsandbytes optimizers update "
            "whole parameters, and zero2 splits each one over 2 ranks") in out.stdout + out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_check_optimizer_refuses_only_bitsandbytes_on_split_parameters():
    check_optimizer({"type": bnb.optim.AdamW8bit}, 1, "zero2")  # one rank: whole parameters
    check_optimizer({"type": torch.optim.AdamW}, 8, "zero3")
    with pytest.raises(EvotuneError, match="PagedAdamW8bit: bitsandbytes optimizers update whole parameters, "
                                           "and zero3 splits each one over 8 ranks"):
        check_optimizer({"type": bnb.optim.PagedAdamW8bit}, 8, "zero3")


def test_resuming_8bit_state_with_torchs_adamw_is_one_line(adamw8bit_runs, tmp_path):
    tmp, one, _ = adamw8bit_runs
    work = _stopped_after_step_2(tmp / "one", tmp_path / "other")
    adamw = tmp_path / "adamw.py"
    adamw.write_text(Path(one).read_text().replace("type=AdamW8bit,", "type=AdamW,").replace(", min_8bit_size=16", ""))
    out = subprocess.run([sys.executable, "-m", "evotune.cli", "train", str(adamw), "--work-dir", str(work),
                          "--device", "cpu", "--resume", "auto"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert "the checkpoint was trained with the optimizer AdamW8bit, this run uses AdamW" in out.stdout + out.stderr
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step_2"]  # nothing saved is lost


def test_moment_bytes_counts_8_bit_state_as_2_bytes_a_parameter_and_torch_adamw_as_8():
    """What 'auto' activation checkpointing subtracts per trained parameter for the optimizer's state."""
    assert moment_bytes({"type": bnb.optim.AdamW8bit}) == moment_bytes({"type": bnb.optim.PagedAdamW8bit}) == 2
    assert moment_bytes({"type": bnb.optim.AdamW, "optim_bits": 8}) == 2
    assert moment_bytes({"type": bnb.optim.AdamW}) == 8  # bitsandbytes' 32-bit AdamW: fp32 moments
    assert moment_bytes({"type": torch.optim.AdamW, "lr": 1e-4}) == 8
    assert moment_bytes(None) == 8


def test_evotune_train_sizes_activation_checkpointing_with_the_optimizers_state(tmp_path, tiny_llama_dir,
                                                                                small_folder, monkeypatch):
    """The loop hands parallelize (where 'auto' checkpointing is sized on a GPU) AdamW8bit's 2 bytes."""
    from evotune.cli import main as cli_main
    from evotune.train import loop

    seen, original = [], loop.parallelize
    monkeypatch.setattr(loop, "parallelize", lambda *a, **k: seen.append(k["moment_bytes"]) or original(*a, **k))
    cfg = _config(tmp_path / "cfg", tiny_llama_dir, small_folder, accum=1)
    assert cli_main(["train", cfg, "--work-dir", str(tmp_path / "work"), "--device", "cpu"]) == 0
    assert seen == [2]
