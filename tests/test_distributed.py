"""Distributed training on CPU with gloo (issue 6): launchers, ZeRO presets on FSDP2, failures.

The preset comparison runs every preset inside one torchrun launch (this file is
also the worker script, see the bottom) to pay the process start-up once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evotune.errors import EvotuneError
from evotune.parallel.launch import expand_nodelist, launcher_environ, torchrun_args
from evotune.parallel.zero import PRESETS, read_deepspeed

REPO = Path(__file__).resolve().parents[1]
PRESET_NAMES = ["replicate", *PRESETS]  # replicate: no --deepspeed flag
STEPS = 4


def tiny_options(model_dir: str, data_dir: str, **overrides) -> list[str]:
    """--cfg-options for the shipped tiny config on the test model and data (4 steps, 64-token packs)."""
    values = {"pretrained_model_name_or_path": model_dir, "dataset_folder": data_dir, "max_length": 64,
              "max_steps": STEPS, "save_steps": 2, "save_total_limit": -1, "accumulative_counts": 2,
              "valid_folder": None, "evaluation_inputs": None}  # the demo's data and prompts are not here
    values.update(overrides)
    return [f"{k}={v!r}" for k, v in values.items()]


def read_metrics(work_dir) -> list[dict]:
    with open(os.path.join(work_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_hf_weights(work_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(work_dir, "hf", "model.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single(options: list[str], work_dir, **kwargs) -> dict:
    """One in-process training run on the CPU (the reference)."""
    from evotune.configs import config_path
    from evotune.parallel.env import DistEnv
    from evotune.settings import load_settings
    from evotune.train.loop import train

    settings = load_settings(config_path("tiny_llama_cpu"), options, seed=0, work_dir=str(work_dir), **kwargs)
    return train(settings, DistEnv(0, 1, 0, torch.device("cpu")))


def assert_same_run(got_dir, ref_dir, rtol=1e-5, atol=1e-6):
    got, ref = read_metrics(got_dir), read_metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in ("loss", "grad_norm", "lr", "tokens"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=rtol, err_msg=key)
    a, b = read_hf_weights(got_dir), read_hf_weights(ref_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- launch (no processes)


def test_expand_nodelist():
    assert expand_nodelist("node1") == ["node1"]
    assert expand_nodelist("node[1-3]") == ["node1", "node2", "node3"]
    assert expand_nodelist("gpu[08-10,12],cpu1") == ["gpu08", "gpu09", "gpu10", "gpu12", "cpu1"]
    assert expand_nodelist("a[1-2]-ib[3-4]") == ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]
    for bad in ("node[1-3", "node[a-b]", ""):
        with pytest.raises(EvotuneError, match="SLURM_NODELIST"):
            expand_nodelist(bad)


def test_slurm_environment():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "sh-[002-003]"}
    assert launcher_environ("slurm", env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                              "MASTER_ADDR": "sh-002", "MASTER_PORT": "29500"}
    assert launcher_environ("slurm", {**env, "PORT": "1234"})["MASTER_PORT"] == "1234"
    assert launcher_environ("slurm", {**env, "PORT": "1234", "MASTER_PORT": "4321"})["MASTER_PORT"] == "4321"
    with pytest.raises(EvotuneError, match="SLURM_NTASKS"):
        launcher_environ("slurm", {"SLURM_PROCID": "0"})
    with pytest.raises(EvotuneError, match="SLURM_PROCID=8 must be below"):
        launcher_environ("slurm", {**env, "SLURM_PROCID": "8"})
    with pytest.raises(EvotuneError, match="RANK, WORLD_SIZE"):
        launcher_environ("pytorch", {})
    assert launcher_environ("none", {}) == {}


def test_torchrun_arguments():
    assert torchrun_args({}) is None
    assert torchrun_args({"NPROC_PER_NODE": "1"}) is None
    assert torchrun_args({"NPROC_PER_NODE": "2"}) == ["--nproc-per-node", "2", "--standalone"]
    assert torchrun_args({"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "ADDR": "10.0.0.1",
                          "PORT": "2222"}) == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
                                               "--master-addr", "10.0.0.1", "--master-port", "2222"]
    with pytest.raises(EvotuneError, match="ADDR"):
        torchrun_args({"NPROC_PER_NODE": "8", "NNODES": "2"})
    with pytest.raises(EvotuneError, match="NPROC_PER_NODE='two'"):
        torchrun_args({"NPROC_PER_NODE": "two"})


def test_relaunch_keeps_every_argument():
    from evotune.train.run import add_arguments, train_argv

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["cfg.py", "--work-dir", "w", "--seed", "3", "--deepspeed", "deepspeed_zero3", "--device", "cpu",
            "--resume", "auto", "--cfg-options", "lr=1e-4", "max_length=128"]
    args = parser.parse_args(argv)
    again = parser.parse_args([*train_argv(args), "--launcher", "pytorch"])
    assert {**vars(again), "launcher": "none"} == vars(args)


# --------------------------------------------------------------------------- --deepspeed


def test_presets_map_to_stages():
    got = {name: (z.stage, z.offload, z.gradient_clipping, z.compute_dtype, z.ignored)
           for name in PRESETS for z in [read_deepspeed(name)]}
    assert got == {
        "deepspeed_zero1": (1, False, None, None, ()),
        "deepspeed_zero2": (2, False, None, None, ()),
        "deepspeed_zero2_offload": (2, True, None, None, ()),
        "deepspeed_zero3": (3, False, None, None, ()),
        "deepspeed_zero3_offload": (3, True, None, None, ()),
    }


def test_deepspeed_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4, "gradient_clipping": 0.5,
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}, "fp16": {"enabled": False},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "offload_param": {"device": "cpu",
                                                                                  "pin_memory": False}},
    }))
    z = read_deepspeed(str(path))
    assert (z.stage, z.offload, z.pin_memory, z.gradient_clipping, z.compute_dtype) == (3, True, False, 0.5,
                                                                                      torch.bfloat16)
    assert z.ignored == ("gradient_accumulation_steps", "zero_allow_untested_optimizer",
                         "zero_optimization.overlap_comm")

    for data, message in (({"fp16": {"enabled": True}}, "fp16 training is not supported"),
                          ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
                          ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "nvme"),
                          ({"gradient_clipping": "big"}, "gradient_clipping must be a number")):
        path.write_text(json.dumps(data))
        with pytest.raises(EvotuneError, match=message):
            read_deepspeed(str(path))
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(EvotuneError, match="line 1: not valid JSON"):
        read_deepspeed(str(path))
    with pytest.raises(EvotuneError, match="neither a preset"):
        read_deepspeed("deepspeed_zero4")


def test_sequence_parallel_size_must_divide_the_world():
    """(Sequence parallel itself is tested in tests/test_sequence_parallel.py.)"""
    from evotune.parallel.env import DistEnv
    from evotune.parallel.mesh import build_mesh

    with pytest.raises(EvotuneError, match="must divide the number of processes"):
        build_mesh(DistEnv(0, 2, 0, torch.device("cpu")), 3)


# --------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, small_folder, tmp_path_factory):
    """1 process, accumulation 4: what 2 processes with accumulation 2 must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    run_single(tiny_options(tiny_llama_dir, small_folder, accumulative_counts=4), work)
    return work


@pytest.fixture(scope="module")
def preset_runs(tiny_llama_dir, small_folder, tmp_path_factory):
    """Every preset on 2 processes (accumulation 2), all in one torchrun launch."""
    out = tmp_path_factory.mktemp("presets")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
         str(out), json.dumps(tiny_options(tiny_llama_dir, small_folder))],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"presets: {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_two_ranks_match_one_rank_with_twice_the_accumulation(preset, preset_runs, reference):
    """Same loss, grad norm and final weights, to fp32 summation-order noise (rtol 1e-5)."""
    assert_same_run(preset_runs / preset, reference)
    assert json.loads((preset_runs / preset / "checkpoints" / f"step_{STEPS}" / "trainer_state.json")
                      .read_text())["strategy"] == preset.removeprefix("deepspeed_")


def test_slurm_launcher_with_two_local_processes(tiny_llama_dir, small_folder, reference, tmp_path):
    work = tmp_path / "slurm"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "NPROC_PER_NODE"):
            env.pop(key, None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "evotune.cli", "train", "tiny_llama_cpu", "--work-dir", str(work), "--seed", "0",
             "--device", "cpu", "--launcher", "slurm", "--deepspeed", "deepspeed_zero3",
             "--cfg-options", *tiny_options(tiny_llama_dir, small_folder)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "2 process(es) on cpu, FSDP2 zero3" in outputs[0]
    assert_same_run(work, reference)


def test_failing_rank_stops_the_whole_command(tiny_llama_dir, small_folder, tmp_path):
    """Rank 1 reads a folder whose only file has no .bin.meta: the command fails fast."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.bin").write_text('{"tokens": [5, 6, 7]}\n')
    config = tmp_path / "rank_dependent.py"
    text = (REPO / "evotune" / "configs" / "tiny_llama_cpu.py").read_text()
    line = "dataset_folder = './work_dirs/demo/assets/data/train'"
    assert line in text
    config.write_text(text.replace(line, f"import os\ndataset_folder = {str(bad)!r} if os.environ.get('RANK') == '1' "
                                         f"else {small_folder!r}"))
    options = [o for o in tiny_options(tiny_llama_dir, small_folder) if not o.startswith("dataset_folder")]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "evotune.cli", "train", str(config), "--work-dir", str(tmp_path / "w"),
         "--device", "cpu", "--deepspeed", "deepspeed_zero2", "--cfg-options", *options],
        cwd=REPO, env={**os.environ, "NPROC_PER_NODE": "2"}, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "broken.bin" in proc.stdout + proc.stderr, proc.stderr[-3000:]


WATCHED = """
import os, time
from evotune.parallel.env import process_group
with process_group("cpu", launcher="slurm") as env:
    if env.rank == 1:
        raise RuntimeError("boom")
    time.sleep(60)  # no collective: only the failure watcher can end this rank early
"""


def test_failing_rank_stops_the_others_without_torchrun():
    """srun-style launch (no torchrun to stop the others): rank 0 ends within seconds of rank 1's error."""
    port = free_port()
    start = time.perf_counter()
    procs = []
    for rank in range(2):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, "-c", WATCHED], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errors = [p.communicate(timeout=60)[1] for p in procs]
    elapsed = time.perf_counter() - start
    assert [p.returncode for p in procs] == [1, 1], errors
    assert "stopping rank 0: rank 1 failed: RuntimeError: boom" in errors[0]
    assert elapsed < 30, f"took {elapsed:.0f} s"


# --------------------------------------------------------------------------- worker (run by torchrun)


def _worker(out_dir: str, options: list[str]) -> None:
    from evotune.configs import config_path
    from evotune.parallel.env import process_group
    from evotune.settings import load_settings
    from evotune.train.loop import train

    with process_group("cpu", launcher="pytorch") as env:
        for name in PRESET_NAMES:
            zero = read_deepspeed(name) if name in PRESETS else None
            train(load_settings(config_path("tiny_llama_cpu"), options, seed=0, work_dir=os.path.join(out_dir, name),
                                deepspeed=zero), env)


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
