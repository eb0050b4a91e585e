"""Faults survived (issue 17, docs/reliability.md): NaN steps, signals, a second run, full disks, kills.

Each test injects one fault into a real ``evotune train`` on the tiny model and
checks what the user sees (one line, the exit code) and what is kept (earlier
checkpoints, a bitwise-equal resume).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evotune.checkpoint import atomic, dcp
from evotune.cli import main as cli_main
from evotune.errors import EvotuneError
from evotune.train import metrics as M
from evotune.train import workdir
from evotune.train.nonfinite import DivergedError, SkipBudget
from tests.conftest import make_tiny_llama
from tests.test_distributed import REPO, read_hf_weights, read_metrics, tiny_options
from tests.test_resume import _process_tree, assert_bitwise_same, evotune_train, finish


def train_cli(work, opts, *extra) -> int:
    """``evotune train`` in this process (one CPU process), as a user runs it."""
    return cli_main(["train", "tiny_llama_cpu", "--seed", "0", "--device", "cpu", "--work-dir", str(work), *extra,
                     "--cfg-options", *opts])


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("evotune: error:")]


def strict_records(path) -> list[dict]:
    """The lines of a jsonl file, refusing NaN/Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_finite_checkpoint(path) -> None:
    weights = dcp.read_model_state(str(path))
    assert weights and all(torch.isfinite(t).all() for t in weights.values()), path


# --------------------------------------------------------------------------- modules


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    holder = workdir.WorkDirLock(str(tmp_path))
    holder.acquire()
    record = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"]
    with pytest.raises(EvotuneError, match=rf"in use by another evotune train \(host {record['host']}, pid "
                                           rf"{os.getpid()}, started {record['started']}\)"):
        workdir.WorkDirLock(str(tmp_path)).acquire()
    holder.release()
    assert not (tmp_path / workdir.LOCK_FILE).exists()

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": record["host"], "pid": gone.pid,
                                                          "started": "yesterday"}))
    with workdir.WorkDirLock(str(tmp_path)) as lock:
        assert f"taking over the lock of a run that is gone (host {record['host']}, pid {gone.pid}, started " \
               "yesterday)" in capsys.readouterr().out
        assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid() and lock.held
    (tmp_path / workdir.LOCK_FILE).write_text('{"host": "vm", "pi')  # torn by a kill while written
    with workdir.WorkDirLock(str(tmp_path)):
        assert "could not be read" in capsys.readouterr().out


def test_an_earlier_run_is_set_aside_whole_with_how_to_continue_it(tmp_path, capsys):
    work = tmp_path / "w"
    (work / "checkpoints" / "step_3").mkdir(parents=True)
    for name in (".metadata", "trainer_state.json"):
        (work / "checkpoints" / "step_3" / name).write_text("{}")
    for name in ("hf", "hf_adapter"):  # a LoRA run's adapter too
        (work / name).mkdir()
        (work / name / "config.json").write_text("{}")
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        (work / name).write_text('{"step": 1}\n')
    (work / workdir.LOCK_FILE).write_text("{}")  # the new run's own lock stays
    aside = Path(workdir.set_aside_run(str(work)))
    assert sorted(p.name for p in work.iterdir()) == [workdir.LOCK_FILE]
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "eval_samples.jsonl", "hf", "hf_adapter",
                                                       "metrics.jsonl"]
    assert (f"held an earlier run (checkpoints, hf, hf_adapter, metrics.jsonl, eval_samples.jsonl); moved to {aside}: "
            f"continue it with --work-dir {aside} --resume auto (from step 3)") in capsys.readouterr().out
    assert dcp.resolve_resume("auto", str(aside)).endswith("step_3")
    assert workdir.set_aside_run(str(work)) is None


def test_leftovers_of_killed_saves_and_exports_are_cleaned(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp_step_4").mkdir(parents=True)
    (ckpts / ".tmp_step_4" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / ".tmp_hf").mkdir()
    (tmp_path / ".old_hf").mkdir()  # killed between the two renames of an overwrite: put back
    (tmp_path / ".old_hf" / "config.json").write_text("{}")
    workdir.remove_leftovers(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "hf"] and not list(ckpts.iterdir())
    assert (tmp_path / "hf" / "config.json").exists()
    assert capsys.readouterr().out.count("left by a save or export that did not finish") == 3


def test_work_dir_checks(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(EvotuneError, match="is a file, not a folder"):
        workdir.prepare(str(tmp_path / "file"))
    with pytest.raises(EvotuneError, match="cannot be created"):
        workdir.prepare(str(tmp_path / "file" / "sub"))


def test_metrics_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path, capsys):
    line = M.strict_json({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    assert json.loads(line) == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3}
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    M.trim_jsonl(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "dropped its last line, cut short when the run was killed" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(EvotuneError, match=r"metrics.jsonl: line 2 is not JSON"):
        M.trim_jsonl(str(path), 2)


def test_skip_budget():
    budget = SkipBudget(max_consecutive=3, max_fraction=0.1, total_steps=100, lr=1e6)
    for step, finite in enumerate([True, False, False, True, False, False], 1):
        budget.step(step, finite)
    with pytest.raises(DivergedError, match=r"at 3 steps in a row \(max_consecutive_skips=3\), first at step 2; "
                                            r".*lower lr \(now 1e\+06\) or check the data around step 2"):
        budget.step(7, False, lambda: "ckpt/step_4")
    assert budget.skipped == 5
    spread = SkipBudget(max_consecutive=5, max_fraction=0.1, total_steps=100, skipped=9)  # 9 from the checkpoint
    spread.step(10, False)
    with pytest.raises(DivergedError, match=r"11 steps in all \(more than max_skipped_fraction of the run, 10 steps"):
        spread.step(12, False)


def test_meta_that_repeats_lines_is_refused_before_training(tmp_path, tiny_llama_dir, capsys):
    import numpy as np

    from evotune.data.ftdp_write import write_bin

    path = tmp_path / "data" / "a.bin"
    write_bin(path, [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    starts = [0, len('{"tokens": [5, 6, 7]}\n'), len('{"tokens": [5, 6, 7]}\n{"tokens": [8, 9]}\n')]
    with open(str(path) + ".meta", "wb") as f:  # rows repeat line 1 and skip line 2; same row count
        np.save(f, np.array([[starts[0], 3], [starts[0], 3], [starts[2], 4]], dtype=np.int64))
    assert train_cli(tmp_path / "w", tiny_options(tiny_llama_dir, str(tmp_path / "data"))) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "row 1 points at line 1 of" in line and "(one row per line, in order)" in line


# --------------------------------------------------------------------------- one process, bad input


def test_second_run_on_a_locked_work_dir_is_refused_in_one_line(tmp_path, tiny_llama_dir, small_folder, capsys):
    work = tmp_path / "w"
    work.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / workdir.LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid,
                                                          "started": "2026-12-02 19:00:00 UTC"}))
        assert train_cli(work, tiny_options(tiny_llama_dir, small_folder)) == 2
        err = capsys.readouterr().err
        assert error_lines(err) == [line for line in err.splitlines() if line.strip()]
        [line] = error_lines(err)
        assert f"is in use by another evotune train (host {os.uname().nodename}, pid {other.pid}" in line
        assert sorted(p.name for p in work.iterdir()) == [workdir.LOCK_FILE]  # nothing touched
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert cli_main(["train", "tiny_llama_cpu", "--device", "cuda", "--work-dir", str(tmp_path)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "evotune: error: --device cuda: no CUDA GPU is visible to this process (torch.cuda.is_available() is False); "
        "use --device cpu, or check the driver and CUDA_VISIBLE_DEVICES"]


def test_work_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "w").write_text("not a folder")
    assert cli_main(["train", "tiny_llama_cpu", "--device", "cpu", "--work-dir", str(tmp_path / "w")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"evotune: error: --work-dir {tmp_path / 'w'} is a file, not a folder: choose another --work-dir"]


# --------------------------------------------------------------------------- NaN


def test_lr_blow_up_skips_counts_and_stops_without_saving_nan(tmp_path, tiny_llama_dir, small_folder, capsys):
    """lr=1e6: step 2 leaves the weights saturated, from step 3 on every gradient norm is NaN."""
    work = tmp_path / "w"
    opts = tiny_options(tiny_llama_dir, small_folder, max_steps=12, save_steps=2, save_total_limit=1, lr=1e6)
    assert train_cli(work, opts) == 2
    captured = capsys.readouterr()
    [line] = error_lines(captured.err)
    assert ("training diverged: the loss or gradient norm was NaN/inf at 5 steps in a row (max_consecutive_skips=5), "
            "first at step 3") in line
    assert f"the last checkpoint, with finite weights, is {work / 'checkpoints' / 'step_2'}" in line
    assert "lower lr (now 1e+06) or check the data around step 3" in line
    assert "evotune: step 3: loss 4.852, grad_norm nan: not applied (1 skipped in all)" in captured.out

    records = strict_records(work / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 3, 4, 5]
    assert all(r["grad_norm"] is None and r["skipped"] for r in records[2:])
    assert records[1]["grad_norm"] is not None and math.isfinite(records[1]["loss"])
    # the NaN steps were not applied (same weights, same loss on the same packs as step 2's weights give),
    # saved nothing and pruned nothing: the finite checkpoint of step 2 is still there; no export
    assert [s for s, _ in dcp.list_checkpoints(work / "checkpoints")] == [2]
    assert_finite_checkpoint(work / "checkpoints" / "step_2")
    assert dcp.read_trainer_state(str(work / "checkpoints" / "step_2"))["skipped_steps"] == 0
    assert not (work / "hf").exists() and not list(work.glob(".tmp_*"))


# --------------------------------------------------------------------------- full disk


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_filesystem_stops_in_one_line_and_keeps_the_earlier_checkpoint(tmp_path, tiny_llama_dir, small_folder,
                                                                          capsys):
    """A tmpfs that holds one checkpoint and a half: the second save is refused before it writes."""
    opts = tiny_options(tiny_llama_dir, small_folder, max_steps=6, save_steps=2, save_total_limit=-1)
    probe = tmp_path / "probe"
    assert train_cli(probe, [*opts, "max_steps=2"]) == 0
    size = atomic.folder_bytes(probe / "checkpoints" / "step_2")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(size * 1.6)):
        pytest.skip("cannot mount a tmpfs here; test_an_os_error_during_a_save_* injects ENOSPC instead")
    try:
        capsys.readouterr()
        assert train_cli(disk / "w", opts) == 2
        [line] = error_lines(capsys.readouterr().err)
        assert line.startswith(f"evotune: error: writing {disk / 'w' / 'checkpoints' / 'step_4'} failed: not enough "
                               f"free space; it needs about ")
        needed = int(line.split("it needs about ")[1].split(" bytes")[0])
        free = int(line.split(" are free there")[0].rsplit(", ", 1)[1])
        assert abs(needed - size) < 100 and free < needed  # step_2's size (its JSON differs by a few bytes)
        assert [s for s, _ in dcp.list_checkpoints(disk / "w" / "checkpoints")] == [2]
        assert sorted(p.name for p in (disk / "w" / "checkpoints").iterdir()) == ["step_2"]
        assert_finite_checkpoint(disk / "w" / "checkpoints" / "step_2")
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_an_os_error_during_a_save_leaves_earlier_saves_and_no_temp_folder(where, tmp_path, tiny_llama_dir,
                                                                         small_folder, monkeypatch, capsys):
    from evotune.checkpoint import hf

    work = tmp_path / "w"
    opts = tiny_options(tiny_llama_dir, small_folder, max_steps=4, save_steps=2, save_total_limit=-1)
    if where == "checkpoint":  # the second save runs out of space while DCP writes its shards
        real, calls = dcp.dcp.save, []

        def save(state, checkpoint_id, **kw):
            calls.append(checkpoint_id)
            if len(calls) == 2:
                Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(state, checkpoint_id=checkpoint_id, **kw)

        monkeypatch.setattr(dcp.dcp, "save", save)
        target, kept = work / "checkpoints" / "step_4", [2]
    else:
        def write_one(path, names, plan):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(hf, "_write_one", write_one)
        target, kept = work / "hf", [2, 4]
    assert train_cli(work, opts) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"evotune: error: writing {target} failed: No space left on device; it needs about ")
    assert "are free there; earlier saves are intact" in line
    assert [s for s, _ in dcp.list_checkpoints(work / "checkpoints")] == kept
    assert not list(work.glob(".tmp_*")) and not list((work / "checkpoints").glob(".tmp_*"))
    assert not (work / "hf").exists()
    if where == "export":  # space freed: --resume auto only exports, from the last checkpoint
        monkeypatch.undo()
        assert train_cli(work, opts, "--resume", "auto") == 0
        saved = dcp.read_model_state(str(work / "checkpoints" / "step_4"))
        exported = read_hf_weights(work)
        assert all(torch.equal(saved[k], exported[k]) for k in exported)


# --------------------------------------------------------------------------- 2 ranks


def test_sequence_parallel_not_dividing_the_heads_under_torchrun_is_one_message(tmp_path, small_folder):
    model = tmp_path / "one_head"
    make_tiny_llama(num_attention_heads=1, num_key_value_heads=1).save_pretrained(model)
    proc = evotune_train(["--work-dir", str(tmp_path / "w"), "--cfg-options",
                          *tiny_options(str(model), small_folder, sequence_parallel_size=2)], nproc=2)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out[-3000:]
    assert out.count("attention heads cannot be split over sequence_parallel_size = 2") == 1, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]


@pytest.fixture(scope="module")
def uninterrupted_2ranks(tiny_llama_dir, small_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    finish(evotune_train(["--work-dir", str(work), "--deepspeed", "deepspeed_zero2", "--cfg-options",
                          *tiny_options(tiny_llama_dir, small_folder, max_steps=6)], nproc=2))
    return work


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for pid in _process_tree(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def test_sigterm_on_one_rank_stops_both_after_a_checkpoint_and_resume_is_bitwise(uninterrupted_2ranks, tiny_llama_dir,
                                                                               small_folder, tmp_path):
    """As slurm's --signal: rank 1 gets SIGTERM; both ranks finish the step, save it, exit 75."""
    work = tmp_path / "w"
    args = ["--work-dir", str(work), "--deepspeed", "deepspeed_zero2", "--cfg-options",
            *tiny_options(tiny_llama_dir, small_folder, max_steps=6)]
    proc = evotune_train(args, nproc=2)
    out = []
    for line in proc.stdout:  # rank 0 prints the settings once both ranks have their handlers
        out.append(line)
        if line.startswith("evotune: 2 process(es) on cpu"):
            break
    else:
        pytest.fail("".join(out)[-3000:])
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    out.append(proc.communicate(timeout=120)[0])
    text = "".join(out)
    assert proc.returncode == 75, text[-3000:]
    saved = [s for s, _ in dcp.list_checkpoints(work / "checkpoints")]
    assert saved and saved[-1] < 6, text[-3000:]
    stopped = saved[-1]
    assert (f"evotune: stopped by a signal to another rank after step {stopped}: checkpoint "
            f"{work / 'checkpoints' / f'step_{stopped}'} saved; continue with --resume auto") in text, text[-3000:]
    assert [r["step"] for r in read_metrics(work)] == list(range(1, stopped + 1))
    assert not (work / "hf").exists() and not (work / workdir.LOCK_FILE).exists()

    finish(evotune_train([*args[:2], "--resume", "auto", *args[2:]], nproc=2))
    assert_bitwise_same(work, uninterrupted_2ranks)


# --------------------------------------------------------------------------- SIGKILL at random moments

# A process that imports evotune once, then forks one child per run: the child arms one kill point
# (SIGKILL to itself at the n-th time it is reached) and runs `evotune train`. Forking before any
# torch computation keeps each run to its model build and steps (~2 s) instead of a cold start.
ZYGOTE = r'''
import json, os, signal, sys
import torch
import evotune.train.loop, evotune.train.run
from evotune.checkpoint import atomic, dcp, hf
from evotune.cli import main
from evotune.train import loop, metrics


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point, n):
    count = [0]

    def due():
        count[0] += 1
        return count[0] == n

    if point == "step":  # forward and backward done, the optimizer not stepped
        real_clip = loop.clip_grad_norm_
        loop.clip_grad_norm_ = lambda *a, **k: die() if due() else real_clip(*a, **k)
    elif point == "metrics":  # half a line of metrics.jsonl written
        real_write = metrics.MetricsWriter.write

        def write(self, record):
            if due():
                line = metrics.strict_json(record) + "\n"
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                die()
            real_write(self, record)
        metrics.MetricsWriter.write = write
    elif point == "save":  # DCP shards written, trainer_state.json not yet, nothing renamed
        real_save = dcp.dcp.save

        def save(*a, **k):
            real_save(*a, **k)
            if due():
                die()
        dcp.dcp.save = save
    elif point == "rename":  # n=1: just before a folder's rename; n=2: just after it
        real_fsync = atomic._fsync_dir
        atomic._fsync_dir = lambda path: die() if due() else real_fsync(path)
    elif point == "prune":  # half of an old checkpoint's files deleted
        real_rmtree = dcp.shutil.rmtree

        def rmtree(path, ignore_errors=False):  # shutil's own: only the prune's calls count
            if sys._getframe(1).f_code.co_name == "_prune" and due():
                for f in sorted(os.listdir(path))[::2]:
                    os.remove(os.path.join(path, f)) if os.path.isfile(os.path.join(path, f)) else None
                die()
            real_rmtree(path, ignore_errors=ignore_errors)
        dcp.shutil.rmtree = rmtree
    elif point == "export":  # half of model.safetensors written
        real_one = hf._write_one

        def write_one(path, names, plan):
            if due():
                real_one(path, names, plan)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die()
            real_one(path, names, plan)
        hf._write_one = write_one


for request in sys.stdin:
    job = json.loads(request)
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if job["point"]:
            arm(job["point"], job["n"])
        code = main(job["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"killed": killed, "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}),
          flush=True)
'''

KILL_POINTS = {"step": 3, "metrics": 3, "save": 2, "rename": 2, "prune": 1, "export": 1}  # point: largest n


class Zygote:
    def __init__(self, tmp_path: Path):
        script = tmp_path / "zygote.py"
        script.write_text(ZYGOTE)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        env.pop("NPROC_PER_NODE", None)
        self.proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.runs = 0
        self.tmp = tmp_path

    def run(self, argv: list[str], point: str | None = None, n: int = 0) -> tuple[dict, str]:
        self.runs += 1
        log = self.tmp / f"run_{self.runs}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "point": point, "n": n, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        return result, log.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def test_sigkill_at_ten_random_moments_then_resume_auto_is_bitwise(tmp_path, tiny_llama_dir, small_folder):
    """Kills mid-step, mid-metrics-line, mid-save, around a rename, mid-prune and mid-export, seeded.

    After each kill ``--resume auto`` (with the next kill armed) continues from the newest complete
    checkpoint; a chain that reaches the end is compared bitwise with an uninterrupted run.
    """
    opts = tiny_options(tiny_llama_dir, small_folder, max_steps=8, save_steps=2, save_total_limit=2)

    def argv(work, resume):
        return ["train", "tiny_llama_cpu", "--seed", "0", "--device", "cpu", "--work-dir", str(work),
                *(["--resume", "auto"] if resume else []), "--cfg-options", *opts]

    zygote = Zygote(tmp_path)
    try:
        result, log = zygote.run(argv(tmp_path / "reference", False))
        assert result["code"] == 0, log[-3000:]
        rng = random.Random(17)
        kills, chains, work, resume = [], 0, tmp_path / "chain_0", False
        while len(kills) < 10:
            assert zygote.runs < 40, kills
            point = rng.choice(sorted(KILL_POINTS))
            n = rng.randint(1, KILL_POINTS[point])
            before = [path for _, path in dcp.list_checkpoints(work / "checkpoints")]
            result, log = zygote.run(argv(work, resume), point, n)
            if resume and before:  # resumed from the newest complete checkpoint there was
                assert f"evotune: resumed from {before[-1]} " in log, (point, n, kills, log[-3000:])
            for path in (work / "checkpoints").glob("step_*"):  # a kill never leaves a partial step_N
                assert_finite_checkpoint(path)
            if result["killed"]:
                kills.append(f"{point}:{n}")
                resume = True
                continue
            assert result["code"] == 0, log[-3000:]  # the point was not reached before the end
            assert_bitwise_same(work, tmp_path / "reference"), kills
            assert not list(work.glob(".tmp_*")) + list(work.glob(".old_*")) + list(work.glob("checkpoints/.tmp_*"))
            chains += 1
            work, resume = tmp_path / f"chain_{chains}", False
        if resume:
            result, log = zygote.run(argv(work, True))
            assert result["code"] == 0, log[-3000:]
            assert_bitwise_same(work, tmp_path / "reference"), kills
    finally:
        zygote.close()
    assert len(set(k.split(":")[0] for k in kills)) >= 4, kills  # the seed covers most kinds of moment


# --------------------------------------------------------------------------- resume guards, config errors


def test_resume_guards_say_what_differs(tmp_path, tiny_llama_dir, small_folder, capsys):
    """Another model shape, another optimizer, not a checkpoint, a damaged one, changed data: one line each."""
    import shutil

    import numpy as np

    from tests.conftest import random_documents, write_folder

    opts = tiny_options(tiny_llama_dir, small_folder, max_steps=2, save_steps=2)
    assert train_cli(tmp_path / "w", opts) == 0
    step_2 = tmp_path / "w" / "checkpoints" / "step_2"

    def refused(path, options, *extra) -> str:
        capsys.readouterr()
        assert train_cli(tmp_path / "other", options, "--resume", str(path), *extra) == 2
        [line] = error_lines(capsys.readouterr().err)
        return line

    wider = tmp_path / "wider"
    make_tiny_llama(intermediate_size=96).save_pretrained(wider)
    line = refused(step_2, tiny_options(str(wider), small_folder, max_steps=4))
    assert "model.llm.model.layers.0.mlp.gate_proj.weight is [128, 64] in the checkpoint but [96, 64] in this model" \
        in line and "another model shape" in line

    sgd = tmp_path / "sgd" / "step_2"
    shutil.copytree(step_2, sgd)
    state = json.loads((sgd / "trainer_state.json").read_text())
    assert state["optimizer"] == "AdamW"
    (sgd / "trainer_state.json").write_text(json.dumps({**state, "optimizer": "SGD"}))
    assert "the checkpoint was trained with the optimizer SGD, this run uses AdamW" in refused(sgd, opts)

    assert "not a checkpoint" in refused(tmp_path / "sgd" / "nothing", opts)

    damaged = tmp_path / "damaged" / "step_2"
    shutil.copytree(step_2, damaged)
    distcp = damaged / "__0_0.distcp"
    os.truncate(distcp, distcp.stat().st_size // 2)
    line = refused(damaged, opts)
    assert "its files cannot be read" in line and "the checkpoint is damaged" in line and "config" not in line

    changed = write_folder(tmp_path / "changed", {"a.bin": random_documents(np.random.RandomState(5), 100)})
    line = refused(step_2, tiny_options(tiny_llama_dir, changed, max_steps=4))
    assert "the training data changed since this checkpoint" in line and "--resume-data-changed=ok" in line
    assert train_cli(tmp_path / "w", tiny_options(tiny_llama_dir, changed, max_steps=4), "--resume", "auto",
                     "--resume-data-changed", "ok") == 0
    assert [r["step"] for r in read_metrics(tmp_path / "w")] == [1, 2, 3, 4]


def test_a_config_that_raises_while_it_runs_is_one_line(tmp_path, capsys):
    config = tmp_path / "raises.py"
    config.write_text("max_length = 64\nlr = 1 / 0\n")
    assert cli_main(["train", str(config), "--device", "cpu", "--work-dir", str(tmp_path / "w")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"evotune: error: {config}:2: the config raised ZeroDivisionError: division by zero; fix that line"]


def _bad_folder(root: Path, case: str) -> str:
    """A data folder with one of the documented problems (docs/data.md, "Errors")."""
    import numpy as np

    from evotune.data.ftdp_write import write_bin

    path = root / "data" / "a.bin"
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    write_bin(path, docs)
    lines = path.read_bytes().splitlines(keepends=True)
    meta = np.load(str(path) + ".meta")
    if case == "corrupt line":
        path.write_bytes(lines[0] + b'{"tokens": [8, 9}\n' + lines[2])
    elif case == "meta/bin mismatch":
        np.save(open(str(path) + ".meta", "wb"), meta[:2])
    elif case == "truncated file":
        path.write_bytes(b"".join(lines)[:-6])
    elif case == "vocab":  # enough tokens for packs of 64
        write_bin(path, [[5, 6, 7] * 20, [8, 500] * 40])
    elif case == "empty folder":
        path.unlink()
        Path(str(path) + ".meta").unlink()
    elif case == "missing meta":
        Path(str(path) + ".meta").unlink()
    elif case == "wrapped int32 meta":
        meta = meta.astype(np.int32)
        meta[2, 0] = -2147483598
        np.save(open(str(path) + ".meta", "wb"), meta)
    return str(root / "data")


BAD_INPUT = {  # case: what the one line says (docs/data.md, docs/reliability.md)
    "corrupt line": "a.bin: line 2 (byte offset 22) is not JSON",
    "meta/bin mismatch": "a.bin.meta has 2 rows but",
    "truncated file": "a.bin: line 3 (byte offset 41) is not JSON",
    "vocab": "beyond the model's vocabulary of 128",
    "empty folder": "has no '*.bin' file",
    "missing meta": "its meta file",
    "wrapped int32 meta": "wrapped past 2 GiB",
    "typo'd key": "unknown key 'max_lenght'",
    "config syntax error": "syntax error: '(' was never closed",
    "missing config": "is neither a file nor a shipped config",
    "sp not dividing the world": "sequence_parallel_size",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_every_documented_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_llama_dir, small_folder, capsys):
    folder = _bad_folder(tmp_path, case) if case in ("corrupt line", "meta/bin mismatch", "truncated file", "vocab",
                                                     "empty folder", "missing meta", "wrapped int32 meta") else small_folder
    opts = tiny_options(tiny_llama_dir, folder, max_steps=1)
    config = "tiny_llama_cpu"
    if case == "typo'd key":
        opts.append("max_lenght=64")
    elif case == "config syntax error":
        config = str(tmp_path / "broken.py")
        Path(config).write_text("max_length = (\n")
    elif case == "missing config":
        config = str(tmp_path / "nowhere.py")
    elif case == "sp not dividing the world":
        opts.append("sequence_parallel_size=2")
    code = cli_main(["train", config, "--device", "cpu", "--work-dir", str(tmp_path / "w"), "--cfg-options", *opts])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Writing", "Loading"))]
    assert len(lines) == 1 and lines[0].startswith("evotune: error:") and BAD_INPUT[case] in lines[0], err
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing written


def test_first_signal_sets_the_flag_and_a_second_ctrl_c_exits_at_once():
    """SIGTERM (again: torchrun forwards what slurm sent) only sets the flag; Ctrl-C after it exits at once."""
    script = ("import os, signal, time\n"
              "from evotune.train.preempt import StopSignals\n"
              "with StopSignals() as stop:\n"
              "    for _ in range(2):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(0.2)\n"
              "        print('flag', stop.requested, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "flag SIGTERM\nflag SIGTERM\n"
    assert proc.stderr.count("got SIGTERM: finishing this step, saving a checkpoint, then exiting (code 75") == 1
    assert "SIGINT after SIGTERM: exiting now, without a checkpoint" in proc.stderr
