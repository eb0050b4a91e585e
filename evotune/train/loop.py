"""The training loop, readable top to bottom.

``train(cfg, work_dir, env)`` builds everything from the config: the (dp, sp)
mesh, the data in InternEvo's order for this data-parallel rank, the model
(sharded with FSDP2 as the ``--deepspeed`` preset says), optimizer and
schedule; it resumes from a checkpoint when asked. Then for each optimizer
step: take ``accumulative_counts`` micro-batches, run forward and backward on
each with InternEvo's loss weights, clip, step, log, save a checkpoint every
``save_steps``. At the end it saves a last checkpoint and exports the model as a
Hugging Face directory in ``<work_dir>/hf``.

Loss weights (DESIGN.md §5): the collate function gives each supervised token
its weight inside its micro-batch; the loop scales by ``1 / accumulative_counts``
(``loss_reduction='pack'``, InternEvo's objective) or by
``dp / global supervised tokens of the step`` (``'token'``). Gradients are then
averaged over data-parallel ranks, so both are exact global objectives.

Sequence parallel (``sequence_parallel_size`` > 1): each rank of an sp group
gets its chunk of every row (``shard_row``) and returns its share of the row's
loss; the loss it backpropagates is multiplied by ``sp``, because FSDP averages
gradients over all ``dp x sp`` ranks while the group's gradient is the sum of its
shares (docs/sequence-parallel.md).

Logged ``loss`` is that global objective (averaged over data-parallel ranks);
``tgs`` is real tokens per GPU per second; ``mfu`` is documented in
:mod:`evotune.train.metrics`.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from evotune.checkpoint import dcp
from evotune.checkpoint.hf import save_hf
from evotune.config import build
from evotune.data.batches import build_data
from evotune.data.collate import model_inputs, packed_collate
from evotune.data.loader import StepLoader
from evotune.errors import EvotuneError
from evotune.parallel.env import DistEnv
from evotune.parallel.fsdp import clip_grad_norm_, parallelize, set_micro_batch, strategy_for
from evotune.parallel.mesh import ParallelMesh, build_mesh
from evotune.parallel.ulysses import check_heads, shard_row
from evotune.parallel.zero import ZeroSettings
from evotune.train import metrics as M
from evotune.train.evaluate import build_sample_evaluator
from evotune.train.optim import build_optimizer
from evotune.train.progress import Progress
from evotune.train.schedule import build_scheduler
from evotune.train.tensorboard import build_visualizer
from evotune.train.type_loss import TypeLoss
from evotune.train.validate import Validator

@dataclass
class TrainState:
    """What changes step to step and must survive a resume."""

    step: int = 0
    consumed_tokens: int = 0
    sampler: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(value: torch.Tensor, pmesh: ParallelMesh) -> torch.Tensor:
    """Sum over all ranks: each pack counted once (an sp rank holds its share of each pack)."""
    if pmesh.dp_size * pmesh.sp_size > 1:
        dist.all_reduce(value)
    return value


def total_steps(cfg: dict, steps_per_epoch: int) -> int:
    if cfg.get("max_steps"):
        return int(cfg["max_steps"])
    epochs = cfg.get("max_epochs", cfg.get("train_cfg", {}).get("max_epochs", 1))
    return max(1, int(round(epochs * steps_per_epoch)))


def compute_dtype(cfg: dict, zero: ZeroSettings | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA unless the DeepSpeed JSON or ``optim_wrapper.dtype`` says fp32; fp32 on the CPU."""
    from evotune.model.load import resolve_dtype

    if device.type != "cuda":
        return torch.float32
    if zero is not None and zero.compute_dtype is not None:
        return zero.compute_dtype
    dtype = resolve_dtype((cfg.get("optim_wrapper") or {}).get("dtype"), torch.bfloat16)
    if dtype == torch.float16:
        raise EvotuneError("optim_wrapper.dtype='float16': fp16 training needs loss scaling, which evotune "
                           "does not do; use 'bfloat16'")
    return dtype


def check_compile(cfg: dict, device: torch.device, dtype: torch.dtype) -> None:
    """``torch_compile`` needs the CUDA varlen kernel (16-bit compute on a GPU): elsewhere attention
    runs one SDPA call per document, which breaks the graph and recompiles for every new count."""
    model_cfg = cfg.get("model") or {}
    if model_cfg.get("torch_compile") and model_cfg.get("use_varlen_attn", True) and (
            device.type != "cuda" or dtype == torch.float32):
        raise EvotuneError(
            f"torch_compile=True needs bf16 compute on a GPU (here: {device.type}, "
            f"{str(dtype).removeprefix('torch.')}): without the CUDA varlen kernel attention runs per "
            "document and recompiles constantly; set torch_compile=False or optim_wrapper.dtype='bfloat16'")


def checkpoint_settings(cfg: dict) -> tuple[int, int]:
    """``(interval, keep)`` from ``checkpoint = dict(interval, max_keep_ckpts)`` or
    ``save_steps``/``save_total_limit``; interval 0: only at the end; keep < 1: all."""
    ck = cfg.get("checkpoint") or {}
    interval = ck.get("interval", cfg.get("save_steps")) or 0
    keep = ck.get("max_keep_ckpts", cfg.get("save_total_limit"))
    return int(interval), -1 if keep is None else int(keep)


def train(cfg: dict, work_dir: str, env: DistEnv, *, seed: int | None = None,
          zero: ZeroSettings | None = None, resume: str | None = None) -> dict:
    """Run the whole training; returns a summary (final loss, steps, paths).

    ``zero``: the ``--deepspeed`` setting (None: plain data parallel);
    ``resume``: ``'auto'`` or a checkpoint path (``--resume``).
    """
    seed = seed if seed is not None else (cfg.get("randomness") or {}).get("seed") or cfg.get("seed") or 0
    seed_everything(seed)
    os.makedirs(work_dir, exist_ok=True)
    pmesh = build_mesh(env, cfg.get("sequence_parallel_size", 1))
    strategy = strategy_for(zero)
    accum = int(cfg.get("accumulative_counts", 1))
    batch_size = int(cfg.get("batch_size", 1))
    loss_reduction = cfg.get("loss_reduction", "pack")

    dataset, sampler = build_data(cfg, pmesh.dp_size, pmesh.dp_rank)
    if len(dataset) == 0:
        raise EvotuneError(f"dataset_folder '{cfg.get('dataset_folder')}': no pack of max_length tokens could be made")
    model = build(cfg["model"])
    llm = model.llm
    dataset.check_vocab_size(llm.get_input_embeddings().num_embeddings)
    heads = llm.config.num_attention_heads
    check_heads(heads, getattr(llm.config, "num_key_value_heads", None) or heads, pmesh.sp_size,
                where=f"model '{cfg.get('pretrained_model_name_or_path')}'")
    export_dtype = next(p.dtype for p in llm.parameters() if p.is_floating_point())
    dtype = compute_dtype(cfg, zero, env.device)
    check_compile(cfg, env.device, dtype)
    n_matmul = M.matmul_params(llm)
    n_layers, attn_dim = M.attention_dim(llm)
    model = parallelize(model, pmesh, strategy, env.device, dtype)
    model.train()

    optim_cfg = cfg["optim_wrapper"]
    optimizer = build_optimizer(optim_cfg["optimizer"], [p for p in model.parameters() if p.requires_grad],
                                env.device)
    max_norm = (optim_cfg.get("clip_grad") or {}).get("max_norm")
    if zero is not None and zero.gradient_clipping is not None:
        max_norm = zero.gradient_clipping
    n_steps = total_steps(cfg, sampler.steps_per_epoch)
    scheduler = build_scheduler(optimizer, [build(p) for p in cfg.get("param_scheduler", [])],
                                sampler.steps_per_epoch, n_steps)
    ckpt_root = dcp.checkpoints_dir(work_dir)
    save_interval, keep = checkpoint_settings(cfg)

    state = TrainState()
    resume_path = dcp.resolve_resume(resume, work_dir) if resume else None
    loaded = None
    if resume_path:
        load_start = time.perf_counter()
        loaded = dcp.load_checkpoint(resume_path, model=model, optimizer=optimizer, scheduler=scheduler)
        load_time = time.perf_counter() - load_start
        state = TrainState(loaded["step"], loaded["consumed_tokens"], loaded["sampler"])
        sampler.load_state_dict(state.sampler)
    elif env.is_main:
        _set_aside_old_checkpoints(ckpt_root)

    loader = StepLoader(dataset, sampler, batch_size=batch_size, micro_num=accum,
                        collate=lambda packs: shard_row(packed_collate(packs, loss_reduction),
                                                        pmesh.sp_rank, pmesh.sp_size),
                        pin_memory=env.device.type == "cuda")
    peak = M.peak_tflops(env.device)
    log_interval = int(cfg.get("log_interval", 1))
    metrics_path = os.path.join(work_dir, "metrics.jsonl")
    if env.is_main and loaded:
        _trim_metrics(metrics_path, state.step)
    writer = M.MetricsWriter(metrics_path, enabled=env.is_main, append=loaded is not None)
    visualizer = build_visualizer(cfg.get("visualizer"), work_dir, enabled=env.is_main)
    progress = Progress(n_steps, enabled=env.is_main, start=state.step)
    tokenizer = build(cfg["tokenizer"]) if cfg.get("evaluation_inputs") and cfg.get("tokenizer") else None
    samples = build_sample_evaluator(cfg, work_dir, tokenizer, is_main=env.is_main, append=loaded is not None,
                                     print_fn=progress.print, device=env.device)
    validator = Validator(cfg, pmesh, env.device) if cfg.get("valid_folder") else None
    type_loss = TypeLoss(dataset.type_names, env.device) if dataset.type_names else None
    global_batch = pmesh.dp_size * batch_size * accum
    progress.print(
        f"evotune: {len(dataset)} packs of {dataset.packed_length} tokens, {sampler.steps_per_epoch} steps/epoch, "
        f"{n_steps} steps; global batch {global_batch} packs = {global_batch * dataset.packed_length} tokens "
        f"(dp {pmesh.dp_size} x batch {batch_size} x accumulation {accum})"
    )
    progress.print(f"evotune: {env.world_size} process(es) on {env.device.type}, "
                   f"{'FSDP2 ' + strategy.name if pmesh.mesh is not None else 'no sharding'}, "
                   f"compute {str(dtype).removeprefix('torch.')}, master weights float32"
                   + (f"; --deepspeed {zero.source}: ignored {', '.join(zero.ignored)}" if zero and zero.ignored
                      else ""))
    if loaded:
        progress.print(f"evotune: resumed from {resume_path} in {load_time:.2f} s (step {state.step}, saved by "
                       f"{loaded.get('world_size')} process(es))")
        dcp.set_rng_state(loaded["rng"])  # last: the model and data were built with the seed's RNG
    elif resume:
        progress.print(f"evotune: --resume {resume}: no checkpoint in {ckpt_root}; starting from scratch")

    last_loss = float("nan")
    saved_step = state.step if loaded else None
    try:
        if samples:
            samples.run(model, state.step)
        while state.step < n_steps:
            t0 = time.perf_counter()
            step = next(loader)
            step_loss, tokens, doc_lengths = _train_step(model, step.micro_batches, env, pmesh, strategy,
                                                         accum, loss_reduction, type_loss)
            grad_norm = clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            flops = M.model_flops(n_matmul, n_layers, attn_dim, doc_lengths) / pmesh.sp_size  # a share per sp rank
            stats = torch.tensor([step_loss, tokens, flops],
                                 dtype=torch.float64, device=env.device)
            _all_reduce(stats, pmesh)
            stats = stats.tolist()  # synchronises with the device
            elapsed = time.perf_counter() - t0
            state.step += 1
            state.consumed_tokens += int(stats[1])
            state.sampler = step.sampler_state
            last_loss = stats[0] / pmesh.dp_size
            record = {
                "step": state.step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": state.consumed_tokens, "tgs": stats[1] / env.world_size / elapsed,
                "data_time": step.data_time, "step_time": elapsed, "epoch": step.sampler_state.get("epoch"),
            }
            if peak:
                record["mfu"] = stats[2] / env.world_size / elapsed / (peak * 1e12)
            if type_loss:
                record.update(type_loss.reduce())  # all ranks: one all-reduce
            if validator and validator.due(state.step, n_steps):
                record.update(validator.run(model))
            writer.write(record)
            if visualizer:
                visualizer.write(record)
            if state.step % log_interval == 0 or state.step == n_steps:
                progress.log(record)
            progress.advance()
            if samples and samples.due(state.step, n_steps):
                samples.run(model, state.step)
            if save_interval and state.step % save_interval == 0:
                _save(ckpt_root, state, model, optimizer, scheduler, keep, llm, pmesh, strategy, env, progress)
                saved_step = state.step
        if saved_step != state.step:
            _save(ckpt_root, state, model, optimizer, scheduler, keep, llm, pmesh, strategy, env, progress)
    finally:
        loader.close()
        progress.close()
        writer.close()
        if visualizer:
            visualizer.close()

    hf_dir = os.path.join(work_dir, "hf")
    _export(model, llm, cfg, hf_dir, env, export_dtype)
    return {"final_loss": last_loss, "steps": state.step, "hf_dir": hf_dir, "metrics": metrics_path,
            "checkpoint": os.path.join(ckpt_root, f"step_{state.step}")}


def _train_step(model, micro_batches: list[dict], env: DistEnv, pmesh: ParallelMesh, strategy, accum: int,
                loss_reduction: str, type_loss: TypeLoss | None = None):
    """Forward/backward over the step's micro-batches; returns (loss, tokens, doc lengths) of this rank."""
    if loss_reduction == "token":
        n_loss = torch.tensor(float(sum(mb["num_loss_tokens"] for mb in micro_batches)), dtype=torch.float64,
                              device=env.device)
        _all_reduce(n_loss, pmesh)
        scale = pmesh.dp_size / max(float(n_loss), 1.0)
    else:
        scale = 1.0 / accum
    total = torch.zeros((), dtype=torch.float32, device=env.device)
    tokens, doc_lengths = 0, []
    for i, mb in enumerate(micro_batches):
        set_micro_batch(model, strategy, last=i == len(micro_batches) - 1)
        inputs = model_inputs(mb, env.device, pmesh.sp_group)
        if type_loss:
            loss, group_sums = model(**inputs, **type_loss.model_inputs(mb))
            type_loss.add(group_sums, mb)
        else:
            loss = model(**inputs)
        loss = loss * scale
        (loss * pmesh.sp_size).backward()
        total += loss.detach()
        tokens += mb["num_tokens"]
        doc_lengths.extend(mb["doc_lengths"].tolist())
    return float(total), tokens, doc_lengths


def _save(root, state: TrainState, model, optimizer, scheduler, keep, llm, pmesh, strategy, env, progress) -> None:
    start = time.perf_counter()
    train_state = {
        "step": state.step, "consumed_tokens": state.consumed_tokens, "sampler": state.sampler,
        "world_size": env.world_size, "dp_size": pmesh.dp_size, "sp_size": pmesh.sp_size,
        "strategy": strategy.name if pmesh.mesh is not None else "none",
        "model_source": getattr(llm, "evotune_source", None),
    }
    path = dcp.save_checkpoint(root, state.step, model=model, optimizer=optimizer, scheduler=scheduler,
                               train_state=train_state, keep=keep, hf_config=llm.config)
    progress.print(f"evotune: checkpoint {path} saved in {time.perf_counter() - start:.2f} s")


def _set_aside_old_checkpoints(root: str) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's (``--resume auto``
    would pick the wrong one, pruning could delete the new ones): move those aside."""
    if dcp.list_checkpoints(root):
        aside = f"{root}.{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(root, aside)
        print(f"evotune: {root} held checkpoints of an earlier run; moved to {aside} "
              "(continue a run with --resume auto)")


def _trim_metrics(path: str, step: int) -> None:
    """Drop records past the checkpoint's step (a killed run logged steps it then lost)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _export(model, llm, cfg: dict, hf_dir: str, env: DistEnv, dtype: torch.dtype) -> None:
    """Gather the full weights (rank 0, on the CPU) and write the HF directory in the source's layout."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=dist.is_initialized()))
    if env.is_main:
        tokenizer = cfg.get("tokenizer")
        tokenizer_path = tokenizer.get("path") if isinstance(tokenizer, dict) else None
        save_hf({k.removeprefix("llm."): v for k, v in state.items()}, hf_dir, config=llm.config,
                source=getattr(llm, "evotune_source", None), save_format=cfg.get("save_format"),
                tokenizer_path=tokenizer_path, dtype=dtype, overwrite=True)
    if dist.is_initialized():
        dist.barrier()
