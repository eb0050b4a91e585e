"""DCP checkpoints and ``--resume`` (issue 6): atomic saves, exact resume, another world size."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from evotune.checkpoint import dcp
from evotune.checkpoint.atomic import WriteError
from evotune.errors import EvotuneError
from tests.test_distributed import REPO, assert_same_run, read_hf_weights, read_metrics, run_single, tiny_options

STEPS = 6


def options(model_dir, data_dir, **overrides):
    return tiny_options(model_dir, data_dir, max_steps=STEPS, **overrides)


def copy_until(src, dst, step: int):
    """A copy of work dir ``src`` as a run stopped right after checkpoint ``step`` would have left it."""
    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, "hf"))
    for s, path in dcp.list_checkpoints(os.path.join(dst, "checkpoints")):
        if s > step:
            shutil.rmtree(path)


def assert_bitwise_same(got_dir, ref_dir):
    a, b = read_hf_weights(got_dir), read_hf_weights(ref_dir)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "epoch")
    assert [[r[k] for k in keys] for r in read_metrics(got_dir)] == [[r[k] for k in keys] for r in read_metrics(ref_dir)]


def evotune_train(args: list[str], nproc: int | None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    return subprocess.Popen([sys.executable, "-m", "evotune.cli", "train", "tiny_llama_cpu", "--seed", "0",
                             "--device", "cpu", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def finish(proc, timeout=120) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


# --------------------------------------------------------------------------- one process


def test_single_process_resume_is_bitwise(tiny_llama_dir, small_folder, tmp_path):
    opts = options(tiny_llama_dir, small_folder)
    full = tmp_path / "full"
    run_single(opts, full)
    assert [s for s, _ in dcp.list_checkpoints(full / "checkpoints")] == [2, 4, 6]
    # the checkpoint holds exactly the exported weights
    saved = dcp.read_model_state(str(full / "checkpoints" / "step_6"))
    hf = read_hf_weights(full)
    assert sorted(saved) == sorted(hf) and all(torch.equal(saved[k], hf[k]) for k in hf)

    resumed = tmp_path / "resumed"
    copy_until(full, resumed, 2)
    (resumed / "checkpoints" / ".tmp_step_4").mkdir()  # a crash in the middle of saving step 4
    (resumed / "checkpoints" / ".tmp_step_4" / "__0_0.distcp").write_bytes(b"partial")
    summary = run_single(opts, resumed, resume="auto")
    assert summary["steps"] == STEPS
    assert_bitwise_same(resumed, full)
    assert not (resumed / "checkpoints" / ".tmp_step_4").exists()


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))

    def step():
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    root = str(tmp_path / "checkpoints")
    step()
    dcp.save_checkpoint(root, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                        train_state={"step": 1}, keep=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state[model.weight]["exp_avg"].clone()
    step()

    real_save = dcp.dcp.save

    def crash(state, checkpoint_id, **kw):
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(dcp.dcp, "save", crash)
    with pytest.raises(WriteError, match=r"step_2 failed: disk full; it needs about \d+ bytes, \d+ are free"):
        dcp.save_checkpoint(root, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                            train_state={"step": 2}, keep=1)
    assert [s for s, _ in dcp.list_checkpoints(root)] == [1]
    assert dcp.resolve_resume("auto", str(tmp_path)).endswith("step_1")

    state = dcp.load_checkpoint(dcp.resolve_resume("auto", str(tmp_path)), model=model, optimizer=optimizer,
                                scheduler=scheduler)
    assert state["step"] == 1 and scheduler.last_epoch == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], exp_avg)

    monkeypatch.setattr(dcp.dcp, "save", real_save)
    step()
    dcp.save_checkpoint(root, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                        train_state={"step": 2}, keep=1)
    assert sorted(os.listdir(root)) == ["step_2"]  # leftovers removed, only the newest kept

    other = torch.nn.Linear(4, 5)
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(EvotuneError, match=r"model.weight is \[3, 4\] in the checkpoint but \[5, 4\] in this model"):
        dcp.load_checkpoint(os.path.join(root, "step_2"), model=other, optimizer=other_opt,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1.0))


def test_resume_arguments(tmp_path):
    assert dcp.resolve_resume("auto", str(tmp_path)) is None
    with pytest.raises(EvotuneError, match="--resume .*not a checkpoint"):
        dcp.resolve_resume(str(tmp_path), str(tmp_path))


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(dcp.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    dcp.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# --------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, small_folder, tmp_path_factory):
    """2 processes, ZeRO-2, accumulation 2, checkpoints at steps 2, 4, 6."""
    work = tmp_path_factory.mktemp("uninterrupted")
    finish(evotune_train(["--work-dir", str(work), "--deepspeed", "deepspeed_zero2", "--cfg-options",
                          *options(tiny_llama_dir, small_folder)], nproc=2))
    return work


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def test_sigkill_at_a_random_step_then_resume_auto_is_bitwise(uninterrupted, tiny_llama_dir, small_folder,
                                                             tmp_path):
    work = tmp_path / "killed"
    args = ["--work-dir", str(work), "--deepspeed", "deepspeed_zero2", "--cfg-options",
            *options(tiny_llama_dir, small_folder)]
    kill_after = random.randint(1, STEPS - 1)
    proc = evotune_train(args, nproc=2)
    deadline = time.monotonic() + 90
    metrics = work / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after):
        assert proc.poll() is None, f"finished before step {kill_after}: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for pid in _process_tree(proc.pid):  # the launcher and both workers at once, as a crashed node
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    assert not (work / "hf").exists(), f"the run finished before the kill after step {kill_after}"

    out = finish(evotune_train([*args[:2], "--resume", "auto", *args[2:]], nproc=2))
    saved = [s for s, _ in dcp.list_checkpoints(work / "checkpoints")]
    assert f"step {STEPS}/{STEPS}" in out, out[-2000:]
    assert_bitwise_same(work, uninterrupted), f"killed after step {kill_after}, checkpoints {saved}"


def test_world_size_2_checkpoint_continues_on_one_process(uninterrupted, tiny_llama_dir, small_folder, tmp_path):
    """Same global batch (1 process x accumulation 4 = 2 x 2): same packs per step, same curve and weights."""
    work = tmp_path / "ws1"
    copy_until(uninterrupted, work, 2)
    state = dcp.read_trainer_state(str(work / "checkpoints" / "step_2"))
    assert (state["world_size"], state["strategy"], state["sampler"]["consumed"]) == (2, "zero2", 8)
    run_single(options(tiny_llama_dir, small_folder, accumulative_counts=4), work, resume="auto")
    assert_same_run(work, uninterrupted)
    final = dcp.read_trainer_state(str(work / "checkpoints" / f"step_{STEPS}"))
    assert final["sampler"] == json.loads((uninterrupted / "checkpoints" / f"step_{STEPS}" / "trainer_state.json")
                                          .read_text())["sampler"]
