"""``evotune batches`` end to end: a config in, InternEvo's golden micro-batches out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evotune.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "conformance" / "internevo_data"
INDEX = GOLDEN / "golden" / "index.json"
CASES = {c["case_id"]: c for c in json.loads(INDEX.read_text())["cases"]} if INDEX.exists() else {}
# dp 2 with accumulation across two epoch boundaries; 'one' mode with min_length; micro_bsz 2 splitting
PICKED = ["small-s16-b1-n3-dp2-m0-cut-seed1024", "long-s64-b2-n1-dp1-m5-one-seed1024",
          "long-s16-b2-n3-dp2-m5-cut-seed1024"]

pytestmark = pytest.mark.skipif(not CASES, reason="../shared/conformance/internevo_data is absent")

CONFIG = """
from evotune import SequenceParallelSampler, build_packed_dataset, load_intern_repo_tokenized_dataset

dataset_folder = {data!r}
max_length = {packed_length}
max_length_per_sample = {seq_len}
pack_sample_into_one = {pack_sample_into_one}
min_length = {min_length}
batch_size = 1
accumulative_counts = {micro_num}
seed = {seed}

train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, data_order_path=None, folder=dataset_folder,
                     min_length=min_length, file_type='.bin'),
    packed_length=max_length, max_length_per_sample=max_length_per_sample,
    pack_sample_into_one=pack_sample_into_one, seed=seed)
train_dataloader = dict(batch_size=batch_size, num_workers=0, sampler=dict(type=SequenceParallelSampler, shuffle=True))
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))


def _config(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG.format(data=str(GOLDEN / params["train_folder"]), **params))
    return path


def _expected(golden: dict, rank: int) -> list[dict]:
    out = []
    for step in golden["ranks"][rank]["steps"]:
        for micro, mb in enumerate(step["micro_batches"]):
            out.append({"step": step["step"], "micro": micro, "input_ids": mb["input_ids"], "labels": mb["labels"],
                        "cu_seqlens": mb["cu_seqlens"], "position_ids": mb["indexes"], "type_ids": mb["type_ids"]})
    return out


@pytest.mark.parametrize("case_id", PICKED)
def test_cli_matches_golden(tmp_path, case_id):
    golden = json.loads((GOLDEN / "golden" / CASES[case_id]["file"]).read_text())
    params = golden["params"]
    cfg = _config(tmp_path, params)
    for rank in range(params["dp_world"]):
        out = tmp_path / f"rank{rank}.jsonl"
        steps = len(golden["ranks"][rank]["steps"])
        assert cli_main(["batches", str(cfg), "--steps", str(steps), "--world-size", str(params["dp_world"]),
                         "--rank", str(rank), "--out", str(out)]) == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert lines == _expected(golden, rank)


def test_cli_subprocess_cfg_options_and_errors(tmp_path):
    """The installed entry point; --cfg-options reaches every use of a setting; a bad flag is one line."""
    golden = json.loads((GOLDEN / "golden" / CASES["small-s16-b1-n1-dp1-m0-cut-seed1024"]["file"]).read_text())
    params = dict(golden["params"], packed_length=64, seq_len=64)  # overridden back to 16 below
    cfg = _config(tmp_path, params)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "evotune.cli", "batches", str(cfg), "--steps", "3",
                          "--cfg-options", "max_length=16", "max_length_per_sample=16"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line) for line in run.stdout.splitlines()] == _expected(golden, 0)[:3]
    bad = subprocess.run([sys.executable, "-m", "evotune.cli", "batches", str(cfg), "--steps", "1",
                          "--world-size", "2", "--rank", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "evotune: error: --rank 2 must lie in [0, --world-size 2)"
