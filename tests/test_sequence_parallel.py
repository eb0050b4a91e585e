"""Ulysses sequence parallel is exact (issue 7): SP=2 on 2 gloo ranks == SP=1 on one process.

The 2-process runs are spawned once per module (interpreter start-up dominates)
and write their losses and summed gradients to files; each test compares one
case with a single-process reference computed here, in fp32, to rtol 1e-5.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evotune.data.collate import packed_collate
from evotune.errors import EvotuneError
from evotune.model.finetune import SupervisedFinetune
from evotune.parallel.ulysses import check_heads, replicate_kv_heads, shard_row
from tests.conftest import make_tiny_llama

MODEL_KEYS = ("input_ids", "position_ids", "loss_index", "loss_labels", "loss_weight",
              "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
SP = 2

# name -> (query heads, key/value heads, use_varlen_attn, fsdp reshard_after_forward or None for no FSDP)
CASES = {
    "gqa_q4_kv2": (4, 2, True, None),
    "gqa_q4_kv1_below_sp": (4, 1, True, None),
    "gqa_q6_kv3_not_divisible_by_sp": (6, 3, True, None),
    "plain_causal_q4_kv1": (4, 1, False, None),
    "zero3_q4_kv1": (4, 1, True, True),
}


def _pack(docs: list[list[int]]) -> dict:
    """One pack holding whole documents, InternEvo labels (next token, -100 at doc end)."""
    ids, labels, pos, cu = [], [], [], [0]
    for d in docs:
        ids += d
        labels += d[1:] + [-100]
        pos += list(range(len(d)))
        cu.append(cu[-1] + len(d))
    return {"input_ids": np.array(ids), "labels": np.array(labels), "position_ids": np.array(pos),
            "cu_seqlens": np.array(cu, dtype=np.int32), "type_ids": np.zeros(len(ids), dtype=np.int64)}


def _micro_batches() -> list[dict]:
    """Two micro-batches (accumulation 2); documents cross the split point; the first row is odd (padded)."""
    rng = np.random.RandomState(0)

    def docs(*lengths):
        return [rng.randint(3, 128, n).tolist() for n in lengths]

    return [packed_collate([_pack(docs(7, 19, 1, 12))], "pack"),             # 39 tokens -> 40, split at 20
            packed_collate([_pack(docs(5, 13)), _pack(docs(11, 7))], "pack")]  # 36 tokens, split at 18


def _model(heads: int, kv_heads: int, varlen: bool) -> SupervisedFinetune:
    llm = make_tiny_llama(seed=3, hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads)
    return SupervisedFinetune(llm, use_varlen_attn=varlen, activation_checkpointing=True)


def _run(model, batches, sp_group=None, sp_rank=0, loss_scale=1.0) -> float:
    """Accumulate the step's gradients; returns the step loss (this rank's share)."""
    total = 0.0
    for batch in batches:
        local = shard_row(batch, sp_rank, SP) if sp_group is not None else batch
        extra = {"sp_group": sp_group} if sp_group is not None else {}
        loss = model(**{k: local[k] for k in MODEL_KEYS}, **extra) / len(batches)
        (loss * loss_scale).backward()
        total += loss.item()
    return total


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=SP)
    group = dist.new_group(list(range(SP)))
    try:
        for name, (heads, kv, varlen, reshard) in CASES.items():
            model = _model(heads, kv, varlen)
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
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=SP, join=True)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_sp2_equals_single_process(sp_results, name):
    heads, kv, varlen, _ = CASES[name]
    reference = _model(heads, kv, varlen)
    ref_loss = _run(reference, _micro_batches())
    got = torch.load(sp_results / f"{name}.pt")
    assert abs(got["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (got["loss"], ref_loss)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


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
