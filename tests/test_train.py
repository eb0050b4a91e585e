"""End-to-end training on CPU: loss falls, accumulation is exact, export reloads, errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evotune.cli import main as cli_main
from evotune.config import build, load_config
from tests.conftest import random_documents, write_folder

CONFIG = """
from evotune import (AdamW, CosineAnnealingLR, LinearLR, SequenceParallelSampler, SupervisedFinetune,
                     build_packed_dataset, load_intern_repo_tokenized_dataset, load_model, load_tokenizer)
pretrained_model_name_or_path = {model!r}
dataset_folder = {data!r}
max_length = 64
batch_size = 1
accumulative_counts = {accum}
max_epochs = 1
max_steps = {steps}
lr = {lr}
max_norm = 1.0
tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)
model = dict(type=SupervisedFinetune, use_varlen_attn=True, activation_checkpointing={ckpt},
             llm=dict(type=load_model, path=pretrained_model_name_or_path, dtype='float32'))
train_dataset = dict(type=build_packed_dataset,
                     dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, folder=dataset_folder),
                     packed_length=max_length, seed=1024)
train_dataloader = dict(batch_size=batch_size, sampler=dict(type=SequenceParallelSampler, shuffle=True))
from torch.optim import SGD
optim_wrapper = dict(optimizer={optim},
                     clip_grad=dict(max_norm=max_norm), accumulative_counts=accumulative_counts)
param_scheduler = {sched}
log_interval = 100
"""


ADAMW = "dict(type=AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)"


def write_config(tmp_path: Path, model: str, data: str, *, accum=1, steps=None, lr=1e-2, ckpt=True,
                 sched="[]", optim=ADAMW) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG.format(model=model, data=data, accum=accum, steps=steps, lr=lr, ckpt=ckpt, sched=sched,
                                  optim=optim))
    return str(path)


def _metrics(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_export_reloads_with_identical_logits(tmp_path, tiny_llama_dir, small_folder):
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path, tiny_llama_dir, small_folder, steps=30, lr=1e-2,
                       sched="[dict(type=LinearLR, start_factor=1/40, begin=0, end=0.1)]")
    work = tmp_path / "work"
    assert cli_main(["train", cfg, "--work-dir", str(work)]) == 0
    rows = _metrics(work)
    assert len(rows) == 30 and [r["step"] for r in rows] == list(range(1, 31))
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 0.5
    assert rows[-1]["tokens"] == 30 * 64

    exported = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    trained = build(load_config(cfg)["model"]["llm"] | {"path": str(work / "hf")})
    ids = torch.randint(3, 128, (2, 17))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)
    weights = dict(exported.named_parameters())
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert not torch.equal(weights["lm_head.weight"], initial.lm_head.weight)


def _pack_mean_loss(llm, pack: dict) -> torch.Tensor:
    """Mean CE of one pack, computed document by document with plain eager attention."""
    labels = torch.from_numpy(pack["labels"])
    cu = pack["cu_seqlens"].tolist()
    total, count = 0.0, 0
    for s, e in zip(cu[:-1], cu[1:]):
        ids = torch.from_numpy(pack["input_ids"][s:e]).unsqueeze(0)
        pos = torch.from_numpy(pack["position_ids"][s:e]).unsqueeze(0)
        logits = llm(input_ids=ids, position_ids=pos).logits[0]
        lab = labels[s:e]
        total = total + F.cross_entropy(logits, lab, ignore_index=-100, reduction="sum")
        count += int((lab != -100).sum())
    return total / count


def test_accumulation_equals_summed_micro_batch_gradients(tmp_path, tiny_llama_dir, small_folder):
    from transformers import AutoModelForCausalLM

    # SGD: the update is -lr * gradient, so the comparison checks the gradients themselves
    # (AdamW's first step is lr * sign(g), which amplifies float noise on tiny gradients)
    cfg_path = write_config(tmp_path, tiny_llama_dir, small_folder, accum=2, steps=1, lr=1.0, ckpt=False,
                            optim="dict(type=SGD, lr=lr)")
    work = tmp_path / "work"
    assert cli_main(["train", cfg_path, "--work-dir", str(work)]) == 0
    trained = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)

    # by hand: the first two packs of the sampler, each pack's mean loss / 2, clip, one SGD step
    cfg = load_config(cfg_path)
    dataset = build(cfg["train_dataset"])
    sampler = build(cfg["train_dataloader"]["sampler"], dataset=dataset, dp_size=1, dp_rank=0, micro_num=2)
    it = iter(sampler)
    packs = [dataset[next(it)] for _ in range(2)]
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    llm.set_attn_implementation("eager")
    grads = []
    for pack in packs:
        llm.zero_grad()
        _pack_mean_loss(llm, pack).backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters()})
    for n, p in llm.named_parameters():
        p.grad = (grads[0][n] + grads[1][n]) / 2
    torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
    torch.optim.SGD(llm.parameters(), lr=1.0).step()
    reference = dict(llm.named_parameters())
    for n, p in trained.named_parameters():
        torch.testing.assert_close(p, reference[n], rtol=1e-5, atol=1e-6, msg=n)
    moved = max((p - q).abs().max().item()
                for p, q in zip(trained.parameters(),
                                AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters()))
    assert moved > 1e-4  # the step did something, so the comparison is meaningful


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "evotune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_folder_is_one_clear_line(tmp_path, tiny_llama_dir, case):
    folder = tmp_path / "data"
    if case == "empty":
        folder.mkdir()
    cfg = write_config(tmp_path, tiny_llama_dir, str(folder), steps=1)
    out = _cli("train", cfg, "--work-dir", str(tmp_path / "w"))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder) in lines[0], out.stderr


def test_token_ids_beyond_vocab_are_rejected_before_training(tmp_path, tiny_llama_dir):
    rng = np.random.RandomState(0)
    docs = random_documents(rng, 20)
    docs[3][0] = 500  # the tiny model's vocabulary is 128
    data = write_folder(tmp_path / "data", {"en/x/a.bin": docs})
    cfg = write_config(tmp_path, tiny_llama_dir, data, steps=1)
    out = _cli("train", cfg, "--work-dir", str(tmp_path / "w"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "500" in out.stderr and "128" in out.stderr
    assert not (tmp_path / "w" / "hf").exists()


@pytest.mark.parametrize("freq", ["4", 0, 2.5])
def test_bad_evaluation_freq_with_validation_only_names_the_key(tmp_path, freq):
    """Without evaluation_inputs the validation loss alone reads evaluation_freq: checked at start-up too."""
    from evotune.errors import EvotuneError
    from evotune.settings import resolve

    cfg = {"valid_folder": str(tmp_path), "evaluation_freq": freq}
    with pytest.raises(EvotuneError, match="^evaluation_freq: expected a positive integer"):
        resolve(cfg)  # the settings every reader takes, validation included


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny model with a tokenizer, two data types, two validation sets, and its config options."""
    from evotune.demo import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("chat_run")
    texts = [f"item {i} is {'even' if i % 2 == 0 else 'odd'} and {i * 3} is its triple." for i in range(300)]
    model_dir = str(root / "model")
    tok = build_tokenizer(texts, model_dir, vocab_size=300)
    build_model(len(tok), model_dir, hidden=64, layers=2)
    enc = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    data = write_folder(root / "train", {"cn/a/x.bin": enc[:120], "en/b/y.bin": enc[120:260]})
    write_folder(root / "valid", {"set1/v.bin": enc[260:], "set2/w.bin": enc[260:280]})
    cfg = write_config(root, model_dir, data, steps=6)
    extra = [f"valid_folder={str(root / 'valid')!r}", "evaluation_freq=4", "max_new_tokens=5",
             "evaluation_inputs=['item 4 is', 'item 7 is']"]
    return root, cfg, extra


def test_samples_validation_and_per_type_loss_during_training(chat_run, tmp_path):
    """evaluation_inputs, valid_folder and type_ids reach the metrics and eval_samples.jsonl."""
    from transformers import AutoModelForCausalLM

    root, cfg, extra = chat_run
    work = tmp_path / "work"
    assert cli_main(["train", cfg, "--work-dir", str(work), "--cfg-options", *extra]) == 0

    rows = _metrics(work)
    assert all({"loss/cn", "loss/en"} & set(r) for r in rows)
    for r in rows:  # a pack's mean loss lies between the mean losses of its types
        per_type = [r[k] for k in ("loss/cn", "loss/en") if k in r]
        assert min(per_type) - 1e-4 <= r["loss"] <= max(per_type) + 1e-4
    val_steps = [r["step"] for r in rows if "val_loss/set1" in r]
    assert val_steps == [4, 6]
    samples = [json.loads(line) for line in (work / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 4, 4, 6, 6]
    assert [s["input"] for s in samples[:2]] == ["item 4 is", "item 7 is"]

    # the last validation loss is the token-weighted mean CE of the set under the exported model
    from evotune.data.packing import build_valid_datasets

    trained = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    trained.set_attn_implementation("eager")
    ds = build_valid_datasets(str(root / "valid"), 64)["set1"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            pack = ds[i]
            mean = _pack_mean_loss(trained, pack).item()
            n = int((pack["labels"] != -100).sum())
            total, count = total + mean * n, count + n
    assert rows[-1]["val_loss/set1"] == pytest.approx(total / count, rel=1e-5)


def test_samples_and_validation_on_two_zero3_ranks(chat_run, tmp_path):
    """2 gloo ranks with ZeRO-3 vs 1 rank with twice the accumulation: same samples, validation and
    per-type losses, no deadlock."""
    root, cfg, extra = chat_run
    single, double = tmp_path / "one", tmp_path / "two"
    assert cli_main(["train", cfg, "--work-dir", str(single), "--cfg-options", *extra, "accumulative_counts=2"]) == 0
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "evotune.cli", "train", cfg, "--work-dir", str(double), "--device",
                          "cpu", "--deepspeed", "deepspeed_zero3", "--cfg-options", *extra, "accumulative_counts=1"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    samples = [[json.loads(line) for line in (w / "eval_samples.jsonl").read_text().splitlines()]
               for w in (single, double)]
    assert [s["step"] for s in samples[1]] == [0, 0, 4, 4, 6, 6]
    assert samples[0] == samples[1]
    one, two = _metrics(single), _metrics(double)
    assert [r["step"] for r in two] == list(range(1, 7))
    keys = {k for r in one for k in r if k.startswith(("loss", "val_loss/"))}
    assert {"loss/cn", "loss/en", "val_loss/set1", "val_loss/set2"} <= keys
    for a, b in zip(one, two):
        assert set(a) & keys == set(b) & keys
        for k in set(a) & keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_torch_compile_without_the_cuda_varlen_kernel_is_refused(tmp_path, tiny_llama_dir, small_folder):
    cfg = write_config(tmp_path, tiny_llama_dir, small_folder, steps=1)
    out = _cli("train", cfg, "--work-dir", str(tmp_path / "w"), "--cfg-options", "model.torch_compile=True")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "torch_compile=True needs bf16 compute on a GPU (here: cpu, float32)" in out.stderr
