"""QLoRA and LoRA under FSDP2 (evotune/parallel/fsdp.py): 4-bit weights unsharded, frozen base in the compute dtype."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from evotune.checkpoint import dcp
from evotune.data.collate import packed_collate
from evotune.model.finetune import SupervisedFinetune
from evotune.model.load import load_model
from evotune.model.layers import decoder_layers
from evotune.model.lora import is_4bit
from evotune.parallel.env import DistEnv
from evotune.parallel.fsdp import (REPLICATE, _set_dtypes_, clip_grad_norm_, parallelize, set_micro_batch, state_bytes,
                                   storage_summary, strategy_for)
from evotune.parallel.mesh import ParallelMesh, build_mesh
from evotune.parallel.zero import ZeroSettings
from evotune.train.loop import _train_step
from tests.conftest import whole_document_pack
from tests.test_lora import QLORA_LLM, _adapter, _lora_model, _metrics, _randomise_lora_b, _train_cli, lora_config_file
from tests.test_train_speed import _batch

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory, tiny_llama_dir, small_folder):
    """One process with accumulation 2 and two gloo ranks (plain data parallel, ZeRO-2, ZeRO-3) with
    accumulation 1, QLoRA NF4. Plain data parallel leaves the whole frozen base out of FSDP2."""
    tmp = tmp_path_factory.mktemp("qlora_sharded")
    one = lora_config_file(tmp, tiny_llama_dir, small_folder, llm_extra=QLORA_LLM, steps=4, lr=3e-2, accum=2)
    Path(one).write_text(Path(one).read_text() + "save_steps = 2\n")
    two = tmp / "cfg2.py"
    two.write_text(Path(one).read_text().replace("accumulative_counts = 2", "accumulative_counts = 1"))
    runs = {"one": tmp / "one"}
    _train_cli(one, runs["one"])
    for preset in ("replicate", "deepspeed_zero2", "deepspeed_zero3"):
        runs[preset] = tmp / preset
        _train_cli(str(two), runs[preset], *(("--deepspeed", preset) if preset != "replicate" else ()), nproc=2)
    return runs


def test_qlora_on_two_gloo_ranks_equals_one_rank_with_twice_the_accumulation(qlora_runs):
    ref_rows, ref = _metrics(qlora_runs["one"]), _adapter(qlora_runs["one"])
    assert ref_rows[-1]["loss"] != ref_rows[0]["loss"]
    for preset in ("replicate", "deepspeed_zero2", "deepspeed_zero3"):
        rows = _metrics(qlora_runs[preset])
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        for a, b in zip(ref_rows, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        got = _adapter(qlora_runs[preset])
        assert got.keys() == ref.keys() and len(ref) == 28  # 7 linear layers x 2 layers, A and B
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
        step = dcp.list_checkpoints(dcp.checkpoints_dir(str(qlora_runs[preset])))[-1][1]
        assert all("lora_" in k for k in dcp.read_model_state(step))  # neither the 4-bit nor the bf16 base


def test_qlora_checkpoint_of_two_ranks_resumes_on_one(qlora_runs, tmp_path, tiny_llama_dir, small_folder):
    import shutil

    work = tmp_path / "moved"
    shutil.copytree(qlora_runs["deepspeed_zero3"], work)
    shutil.rmtree(work / "hf_adapter")
    shutil.rmtree(work / "checkpoints" / "step_4")
    one = lora_config_file(tmp_path, tiny_llama_dir, small_folder, llm_extra=QLORA_LLM, steps=4, lr=3e-2, accum=2)
    Path(one).write_text(Path(one).read_text() + "save_steps = 2\n")
    _train_cli(one, work, "--resume", "auto")
    got, ref = _adapter(work), _adapter(qlora_runs["one"])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


def _qlora_model(path: str, storage=None) -> SupervisedFinetune:
    quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                 bnb_4bit_compute_dtype=torch.bfloat16)
    if storage is not None:
        quant["bnb_4bit_quant_storage"] = storage
    return SupervisedFinetune(load_model(path, dtype="bfloat16", quantization_config=quant),
                              activation_checkpointing=False, torch_compile=False, fused_kernels="none",
                              lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_trained_weights_become_fp32_frozen_ones_the_compute_dtype_and_4bit_stays(tiny_llama_dir, storage):
    model = _qlora_model(tiny_llama_dir, storage)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if is_4bit(p)}
    assert len(packed) == 14 and all(p.dtype == (storage or torch.uint8) for p in packed.values())
    _set_dtypes_(model, torch.bfloat16)
    for name, p in model.named_parameters():
        if is_4bit(p):  # a bf16-stored 4-bit weight is floating point, yet never cast (bits compared: some are NaN)
            assert p.dtype == packed[name].dtype
            assert torch.equal(p.detach().view(torch.uint8), packed[name].view(torch.uint8)), name
        elif p.requires_grad:
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16, name
    assert storage_summary(model) == "trained weights float32, frozen 4-bit + bfloat16"
    # what 'auto' activation checkpointing subtracts: 16 B per trained parameter (+2 for its bf16 copy), the
    # stored bytes of a frozen one (+2 gathered), a 4-bit weight's packed bytes. Without FSDP2 the strategy
    # stays the preset's (nothing is resharded; the one-rank FSDP2 case is the test below)
    one = ParallelMesh(None, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0)
    assert strategy_for(None, one, frozen_base=True) == REPLICATE
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and not is_4bit(p))
    four = sum(p.nbytes for p in model.parameters() if is_4bit(p))
    assert 0 < four < sum(p.numel() for p in packed.values()) * 4
    assert state_bytes(model, one, REPLICATE, torch.bfloat16) == int(n_trained * 18 + frozen * 4 + four)
    # bitsandbytes' 8-bit moments (train.optim.moment_bytes): 2 bytes of state per trained parameter, not 8
    assert state_bytes(model, one, REPLICATE, torch.bfloat16, moment_bytes=2) == int(n_trained * 12 + frozen * 4
                                                                                     + four)


@pytest.fixture
def one_process_group():
    """A gloo group of one, as ``evotune train`` has on one GPU, so that FSDP2 is applied."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield build_mesh(DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage, offload, frozen_sharded", [(0, False, False), (3, False, False), (3, True, True)])
def test_frozen_base_stays_out_of_fsdp_where_nothing_is_split(one_process_group, tiny_llama_dir, stage, offload,
                                                              frozen_sharded):
    """One process (or replicate): FSDP2 manages the adapter only; the frozen base stays a plain bf16 tensor
    (no all-gathered copy), 4-bit weights too. With offload, FSDP2 keeps the base to put it on the CPU."""
    model = _qlora_model(tiny_llama_dir)
    strategy = strategy_for(_zero(stage, offload) if stage else None, one_process_group, frozen_base=True)
    assert strategy.reshard_after_forward  # zero3 anyway; replicate as a one-rank LoRA run
    parallelize(model, one_process_group, strategy, torch.device("cpu"), torch.bfloat16, tokens=64, log=None)
    frozen = [p for p in model.parameters() if not p.requires_grad and not is_4bit(p)]
    assert frozen and all(isinstance(p, DTensor) == frozen_sharded for p in frozen)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert not any(isinstance(p, DTensor) for p in model.parameters() if is_4bit(p))
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in frozen)
    four = sum(p.nbytes for p in model.parameters() if is_4bit(p))
    # the layers reshard after forward: no bf16 copy of the adapter, nor of an offloaded base's layers, is
    # held; the root's frozen embedding, norm and head stay gathered beside their bf16 shard of one rank
    in_layers = {id(p) for layer in decoder_layers(model.llm, "test") for p in layer.parameters()}
    assert all(id(p) in in_layers for p in model.parameters() if p.requires_grad)
    gathered = 2 * sum(p.numel() for p in frozen if id(p) not in in_layers) if frozen_sharded else 0
    assert 0 < gathered < 2 * n_frozen or not frozen_sharded
    assert state_bytes(model, one_process_group, strategy, torch.bfloat16) == n_trained * 16 + n_frozen * 2 \
        + gathered + four
    kept = dataclasses.replace(strategy, reshard_after_forward=False)  # a layer that keeps its copies
    assert state_bytes(model, one_process_group, kept, torch.bfloat16) == n_trained * 18 + n_frozen * 2 \
        + (2 * n_frozen if frozen_sharded else 0) + four
    loss = model(**_batch(seed=1))  # and it trains: every adapter weight gets a gradient, nothing else
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.to_local().abs().sum() > 0
               for n, p in model.named_parameters() if "lora_B" in n)  # (A: zero, as B starts at 0)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _zero(stage: int, offload: bool = False) -> ZeroSettings:
    return ZeroSettings(source=f"deepspeed_zero{stage}", stage=stage, offload=offload, pin_memory=False,
                        gradient_clipping=None, compute_dtype=None, ignored=())


def _full_model(path: str) -> SupervisedFinetune:
    return SupervisedFinetune(load_model(path, dtype="float32"), activation_checkpointing=False,
                              torch_compile=False, fused_kernels="none")


def _layer_states(model) -> set[str]:
    """The FSDP2 states of the decoder layers' parameters: {'SHARDED'} once every layer has freed its
    gathered (bf16) copy, {'UNSHARDED'} while every layer holds it."""
    return {p.sharded_state.name for layer in decoder_layers(model.llm, "test")
            for group in layer._get_fsdp_state()._fsdp_param_groups for p in group.fsdp_params}


def test_only_a_lora_run_on_one_unoffloaded_rank_reshards_every_preset_and_keeps_the_name():
    one = ParallelMesh(object(), dp_size=1, dp_rank=0, sp_size=1, sp_rank=0)  # FSDP2 on a process group of one
    two = ParallelMesh(object(), dp_size=2, dp_rank=0, sp_size=1, sp_rank=0)
    for zero in (None, _zero(1), _zero(2), _zero(3)):
        full = strategy_for(zero, one, frozen_base=False)
        assert full.reshard_after_forward == (zero is not None and zero.stage == 3)  # the preset's
        lora = strategy_for(zero, one, frozen_base=True)
        assert lora == dataclasses.replace(full, reshard_after_forward=True) and lora.name == full.name
        # two ranks shard the base under ZeRO: the preset; replicate still splits nothing
        assert strategy_for(zero, two, frozen_base=True) == (lora if zero is None else full)
        assert strategy_for(zero, two, frozen_base=False) == full
    offloaded = strategy_for(_zero(2, offload=True), one, frozen_base=True)  # FSDP2 keeps the base to offload it
    assert offloaded.name == "zero2_offload" and not offloaded.reshard_after_forward


@pytest.mark.parametrize("preset, lora, resharded", [
    (None, True, True), (2, True, True), (2, False, False), (1, False, False), (3, False, True)])
def test_one_rank_lora_layers_free_their_bf16_copy_after_forward_and_each_micro_batch(
        one_process_group, tiny_llama_dir, preset, lora, resharded):
    """A one-rank LoRA run frees each layer's bf16 adapter copy after its forward, and after the backward of
    a micro-batch that is not the step's last; a full fine-tune under zero1/2 (or replicate) keeps it."""
    strategy = strategy_for(_zero(preset) if preset else None, one_process_group, frozen_base=lora)
    model = (_lora_model if lora else _full_model)(tiny_llama_dir)
    parallelize(model, one_process_group, strategy, torch.device("cpu"), torch.bfloat16, tokens=64, log=None)
    want = {"SHARDED" if resharded else "UNSHARDED"}
    set_micro_batch(model, strategy, last=False)  # the first of two micro-batches
    loss = model(**_batch(seed=1))
    assert _layer_states(model) == want
    loss.backward()
    assert _layer_states(model) == want
    set_micro_batch(model, strategy, last=True)
    model(**_batch(seed=2)).backward()
    assert _layer_states(model) == {"SHARDED"}  # the step's last backward frees every copy


@pytest.mark.parametrize("preset, quantized, dtype", [
    (2, False, torch.bfloat16), (None, False, torch.bfloat16), (None, False, torch.float32),
    (1, True, torch.bfloat16)])
def test_resharding_after_forward_changes_no_number_of_a_lora_step(one_process_group, tiny_llama_dir, preset,
                                                                   quantized, dtype):
    """One step, accumulation 2, through the loop's own _train_step, clipping and AdamW: bitwise the same loss,
    gradient norm and adapter with the one-rank LoRA strategy as with the preset's layers kept gathered."""
    new = strategy_for(_zero(preset) if preset else None, one_process_group, frozen_base=True)
    old = dataclasses.replace(new, reshard_after_forward=False)
    assert new.reshard_after_forward
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = [packed_collate([whole_document_pack(docs)], "token")
               for docs in ([[5, 9, 3, 7, 11, 2], [4, 8, 12]], [[6, 10, 14, 3, 5, 9, 20, 31]])]
    results = []
    for strategy in (old, new):
        torch.manual_seed(0)  # the same adapter A
        model = _qlora_model(tiny_llama_dir) if quantized else _lora_model(tiny_llama_dir)
        if quantized:
            _randomise_lora_b(model)
        parallelize(model, one_process_group, strategy, env.device, dtype, tokens=64, log=None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        loss = _train_step(model, batches, env, one_process_group, strategy, 2, "token")[0]
        norm = clip_grad_norm_(params, 1.0)
        optimizer.step()
        results.append((loss, norm, {n: p.full_tensor().clone() for n, p in model.named_parameters()
                                     if p.requires_grad}))
    (loss0, norm0, adapter0), (loss1, norm1, adapter1) = results
    assert torch.isfinite(loss0) and norm0 > 0
    assert torch.equal(loss1, loss0) and torch.equal(norm1, norm0)
    assert adapter1.keys() == adapter0.keys() and len(adapter0) == 28
    for name in adapter0:
        assert torch.equal(adapter1[name], adapter0[name]), name
