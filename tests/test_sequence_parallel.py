"""Ulysses sequence parallel is exact (issue 7): SP=2 on 2 gloo ranks == SP=1 on one process.

Everything that needs 2 processes runs in one torchrun launch per module (this
file is also the worker script, see the bottom; interpreter start-up
dominates): the module-level cases write their losses and summed gradients to
files, the training runs their metrics and exported weights. Each test compares
one case with a single-process reference computed here, in fp32, to rtol 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from evotune.data.collate import MODEL_INPUTS, packed_collate
from evotune.errors import EvotuneError
from evotune.model.checkpointing import set_activation_checkpointing
from evotune.model.finetune import SupervisedFinetune
from evotune.parallel.ulysses import check_heads, replicate_kv_heads, shard_row
from tests.conftest import REPO, make_tiny_llama, whole_document_pack

SP = 2
TRAIN_PRESETS = ["replicate", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"]  # replicate: no --deepspeed

# name -> (query heads, key/value heads, use_varlen_attn, fsdp reshard_after_forward or None for no FSDP);
# the FSDP case also recomputes layers in backward (activation checkpointing: the all-to-alls run again)
CASES = {
    "gqa_q4_kv2": (4, 2, True, None),
    "gqa_q4_kv1_below_sp": (4, 1, True, None),
    "gqa_q6_kv3_not_divisible_by_sp": (6, 3, True, None),
    "plain_causal_q4_kv1": (4, 1, False, None),
    "zero3_q4_kv1": (4, 1, True, True),
}


def _micro_batches() -> list[dict]:
    """Two micro-batches (accumulation 2); documents cross the split point; the first row is odd (padded)."""
    rng = np.random.RandomState(0)

    def docs(*lengths):
        return [rng.randint(3, 128, n).tolist() for n in lengths]

    pack = whole_document_pack
    return [packed_collate([pack(docs(7, 19, 1, 12))], "pack"),             # 39 tokens -> 40, split at 20
            packed_collate([pack(docs(5, 13)), pack(docs(11, 7))], "pack")]  # 36 tokens, split at 18


def _model(heads: int, kv_heads: int, varlen: bool, checkpointing: bool) -> SupervisedFinetune:
    llm = make_tiny_llama(seed=3, hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads)
    model = SupervisedFinetune(llm, use_varlen_attn=varlen)
    set_activation_checkpointing(model.llm, checkpointing)  # what parallelize does in training
    return model


def _run(model, batches, sp_group=None, sp_rank=0, loss_scale=1.0) -> float:
    """Accumulate the step's gradients; returns the step loss (this rank's share)."""
    total = 0.0
    for batch in batches:
        local = shard_row(batch, sp_rank, SP) if sp_group is not None else batch
        extra = {"sp_group": sp_group} if sp_group is not None else {}
        loss = model(**{k: local[k] for k in MODEL_INPUTS}, **extra) / len(batches)
        (loss * loss_scale).backward()
        total += loss.item()
    return total


def _module_cases(rank: int, out_dir: str) -> None:
    """Each case's step loss and gradients summed over the sp group (rank 0 writes them)."""
    group = dist.group.WORLD
    for name, (heads, kv, varlen, reshard) in CASES.items():
        model = _model(heads, kv, varlen, checkpointing=reshard is not None)
        scale = 1.0
        if reshard is not None:
            from torch.distributed.fsdp import fully_shard

            for layer in model.llm.model.layers:
                fully_shard(layer, reshard_after_forward=reshard)
            fully_shard(model, reshard_after_forward=reshard)
            scale = SP  # FSDP averages over the sp ranks; the row's gradient is their sum
        loss = torch.tensor(_run(model, _micro_batches(), group, rank, scale))
        dist.all_reduce(loss, group=group)
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            else:
                dist.all_reduce(g, group=group)
            grads[n] = g.detach().clone()
        if rank == 0:
            torch.save({"loss": loss.item(), "grads": grads}, os.path.join(out_dir, f"{name}.pt"))


def _train_options(model_dir: str, data_dir: str, sp: int) -> list[str]:
    """63-token packs (padded to 64 under SP=2), accumulation 2, 4 steps."""
    from tests.test_distributed import tiny_options

    return tiny_options(model_dir, data_dir, max_length=63, accumulative_counts=2, save_steps=0,
                        sequence_parallel_size=sp)


@pytest.fixture(scope="module")
def kv1_model_dir(tmp_path_factory) -> str:
    """The tiny test Llama with one key/value head, fewer than SP."""
    path = tmp_path_factory.mktemp("tiny_llama_kv1")
    make_tiny_llama(num_key_value_heads=1).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sp_results(kv1_model_dir, small_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(SP), __file__,
         str(out), json.dumps(_train_options(kv1_model_dir, small_folder, SP))],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"sequence parallel runs: {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_module_sp2_equals_single_process(sp_results, name):
    """Loss and every parameter gradient of one step with accumulation 2."""
    heads, kv, varlen, _ = CASES[name]
    reference = _model(heads, kv, varlen, checkpointing=False)
    ref_loss = _run(reference, _micro_batches())
    got = torch.load(sp_results / f"{name}.pt")
    assert abs(got["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (got["loss"], ref_loss)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.fixture(scope="module")
def train_reference(kv1_model_dir, small_folder, tmp_path_factory) -> Path:
    from tests.test_distributed import run_single

    work = tmp_path_factory.mktemp("sp_reference")
    run_single(_train_options(kv1_model_dir, small_folder, 1), work)
    return work


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_training_sp2_equals_one_process(preset, sp_results, train_reference):
    """Same loss curve, grad norms, token counts and final weights as 1 process (rtol 1e-5)."""
    from tests.test_distributed import assert_same_run

    assert_same_run(sp_results / preset, train_reference)
    state = json.loads((sp_results / preset / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert (state["dp_size"], state["sp_size"]) == (1, SP)


def test_shards_cover_the_row_with_global_weights():
    batch = _micro_batches()[0]  # 39 tokens
    shards = [shard_row(batch, r, SP) for r in range(SP)]
    assert [s["input_ids"].shape[1] for s in shards] == [20, 20]
    for key in ("input_ids", "position_ids", "labels"):
        row = torch.cat([s[key] for s in shards], dim=1)
        torch.testing.assert_close(row[:, :39], batch[key])
    assert torch.cat([s["labels"] for s in shards], dim=1)[0, 39].item() == -100
    assert torch.cat([s["position_ids"] for s in shards], dim=1)[0, 39].item() == 0
    assert shards[0]["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_q"].tolist() + [40]
    offsets = [0, 20]
    index = torch.cat([s["loss_index"] + o for s, o in zip(shards, offsets)])
    torch.testing.assert_close(index, batch["loss_index"])
    torch.testing.assert_close(torch.cat([s["loss_weight"] for s in shards]), batch["loss_weight"])
    torch.testing.assert_close(torch.cat([s["loss_labels"] for s in shards]), batch["loss_labels"])
    assert sum(s["num_tokens"] for s in shards) == batch["num_tokens"]
    assert sum(s["num_loss_tokens"] for s in shards) == batch["num_loss_tokens"]


def test_query_heads_not_divisible_by_sp_is_rejected():
    check_heads(4, 1, 2)
    with pytest.raises(EvotuneError, match="sequence_parallel_size = 3"):
        check_heads(4, 2, 3, where="model 'tiny'")


def test_replicated_kv_heads_keep_each_query_heads_pairing():
    """After repeating kv heads to lcm(kv, sp), query head h still reads its own kv head h // (Hq / Hkv)."""
    hq, hkv, sp = 12, 3, 4
    kv = torch.arange(hkv).float().view(1, hkv, 1, 1)
    rep = replicate_kv_heads(kv, sp)
    assert rep.shape[1] % sp == 0 and hq % rep.shape[1] == 0
    per_q = rep.repeat_interleave(hq // rep.shape[1], dim=1).flatten().tolist()
    assert per_q == [h // (hq // hkv) for h in range(hq)]


# --------------------------------------------------------------------------- worker (run by torchrun)


def _worker(out_dir: str, options: list[str]) -> None:
    from evotune.configs import config_path
    from evotune.parallel.env import process_group
    from evotune.parallel.zero import read_deepspeed
    from evotune.settings import load_settings
    from evotune.train.loop import train

    with process_group("cpu", launcher="pytorch") as env:
        _module_cases(env.rank, out_dir)
        for preset in TRAIN_PRESETS:
            zero = read_deepspeed(preset) if preset != "replicate" else None
            train(load_settings(config_path("tiny_llama_cpu"), options, seed=0,
                                work_dir=os.path.join(out_dir, preset), deepspeed=zero), env)


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
