"""The training loop, readable top to bottom.

``train(settings, env)`` builds everything from the settings
(:mod:`evotune.settings`): the (dp, sp)
mesh, the data in InternEvo's order for this data-parallel rank, the model
(sharded with FSDP2 as the ``--deepspeed`` preset says), optimizer and
schedule; it resumes from a checkpoint when asked. Then for each optimizer
step: take ``accumulative_counts`` micro-batches, run forward and backward on
each with InternEvo's loss weights, clip, step, log; the
:class:`~evotune.checkpoint.checkpointer.Checkpointer` saves every
``checkpoint.interval`` steps and at the end. Then the model is exported as a
Hugging Face directory in ``<work_dir>/hf``.

Loss weights (docs/loss.md): the collate function gives each supervised token
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

import contextlib
import functools
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from evotune.checkpoint import dcp
from evotune.checkpoint.adapter import export_adapter, merge_adapter
from evotune.checkpoint.checkpointer import Checkpointer, Resumed, TrainState
from evotune.checkpoint.hf import save_hf
from evotune.checkpoint.source import ModelSource
from evotune.config import build
from evotune.data.build import build_data
from evotune.data.collate import model_inputs, packed_collate
from evotune.data.inspect import pack_tokens, render_document
from evotune.data.loader import StepLoader
from evotune.dtypes import dtype_name, parse_dtype
from evotune.errors import EvotuneError
from evotune.model import hub
from evotune.model.lora import adapter_config, adapter_modules, is_4bit, shares_qkv_a
from evotune.parallel.env import DistEnv
from evotune.parallel.fsdp import (clip_grad_norm_, parallelize, set_micro_batch, shards, storage_summary,
                                   strategy_for)
from evotune.parallel.mesh import ParallelMesh, build_mesh
from evotune.parallel.ulysses import check_heads, shard_row
from evotune.settings import ScheduleSettings, Settings
from evotune.train import metrics as M
from evotune.train import workdir
from evotune.train.evaluate import SAMPLES_FILE, build_sample_evaluator
from evotune.train.loss_scale import LossScaler
from evotune.train.nonfinite import SkipBudget
from evotune.train.optim import build_optimizer, check_optimizer, moment_bytes
from evotune.train.preempt import Preempted, StopSignals
from evotune.train.progress import Progress
from evotune.train.schedule import build_scheduler
from evotune.train.tensorboard import build_visualizer
from evotune.train.type_loss import TypeLoss
from evotune.train.validate import Validator
from evotune.xtuner_compat import tokenizer_path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(value: torch.Tensor, pmesh: ParallelMesh) -> torch.Tensor:
    """Sum over all ranks: each pack counted once (an sp rank holds its share of each pack)."""
    if pmesh.dp_size * pmesh.sp_size > 1:
        dist.all_reduce(value)
    return value


def total_steps(schedule: ScheduleSettings, steps_per_epoch: int) -> int:
    if schedule.max_steps:
        return schedule.max_steps
    return max(1, int(round(schedule.max_epochs * steps_per_epoch)))


def compute_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """bf16 on CUDA unless ``optim.dtype`` (the DeepSpeed JSON or ``optim_wrapper.dtype``) says fp32 or fp16;
    fp32 on the CPU, unless fp16 is asked for (then autocast, so that fp16 runs can be tested on a CPU).
    fp16 always comes with loss scaling (evotune/train/loss_scale.py)."""
    dtype = parse_dtype(settings.optim.dtype, torch.bfloat16, what="optim_wrapper.dtype")
    if device.type != "cuda" and dtype != torch.float16:
        return torch.float32
    return dtype


def forward_context(dtype: torch.dtype, device: torch.device):
    """float16 on the CPU computes under autocast (the weights stay fp32 there); CUDA casts through
    FSDP2's mixed precision policy instead (evotune/parallel/fsdp.py)."""
    if dtype == torch.float16 and device.type != "cuda":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def set_determinism(runtime) -> None:
    """``env_cfg.cudnn_benchmark`` and ``randomness.deterministic`` (mmengine's meaning)."""
    torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)


@dataclass
class _Model:
    """The sharded module and what the loop needs to know of the model inside it."""

    module: torch.nn.Module
    llm: torch.nn.Module
    compute_dtype: torch.dtype
    export_dtype: torch.dtype
    flops: tuple  # (matmul parameters, layers, attention width): metrics.model_flops's model inputs


def _build_model(settings: Settings, dataset, pmesh: ParallelMesh, strategy, env: DistEnv) -> _Model:
    """Build the model, check it against the data and the mesh, shard it (FSDP2)."""
    if settings.model.spec is None:
        raise EvotuneError("the config has no model = dict(type=SupervisedFinetune, llm=...)")
    model = build(settings.model.spec)
    llm = model.llm
    dataset.check_vocab_size(llm.get_input_embeddings().num_embeddings)
    heads = llm.config.num_attention_heads
    check_heads(heads, getattr(llm.config, "num_key_value_heads", None) or heads, pmesh.sp_size,
                where=f"model '{settings.model.path}'")
    export_dtype = next(p.dtype for p in llm.parameters() if p.is_floating_point() and not is_4bit(p))
    dtype = compute_dtype(settings, env.device)
    flops = (M.matmul_params(llm), *M.attention_dim(llm))
    # checkpointing ('auto': sized for this micro-batch) and compilation (model/compile.decide) are applied here
    model = parallelize(model, pmesh, strategy, env.device, dtype if env.device.type == "cuda" else torch.float32,
                        tokens=dataset.packed_length * settings.data.batch_size // pmesh.sp_size,
                        log=print if env.is_main else None, moment_bytes=moment_bytes(settings.optim.optimizer))
    model.train()
    return _Model(model, llm, dtype, export_dtype, flops)


def train(settings: Settings, env: DistEnv) -> dict:
    """Run the whole training; returns a summary (final loss, steps, paths).

    Rank 0 holds the work dir's lock for the whole run; SIGTERM, SIGINT and
    SIGUSR1 end it after a step and a checkpoint with :class:`Preempted`
    (docs/reliability.md).
    """
    workdir.prepare(settings.runtime.work_dir)
    lock = workdir.WorkDirLock(settings.runtime.work_dir) if env.is_main else contextlib.nullcontext()
    with lock, StopSignals(is_main=env.is_main) as stop:
        return _train(settings, env, stop)


def _train(s: Settings, env: DistEnv, stop: StopSignals) -> dict:
    seed_everything(s.runtime.seed)
    set_determinism(s.runtime)
    work_dir = s.runtime.work_dir
    if env.is_main:
        workdir.remove_leftovers(work_dir)
    pmesh = build_mesh(env, s.parallel.sequence_parallel_size)
    strategy = strategy_for(s.parallel.deepspeed, pmesh, frozen_base=bool((s.model.spec or {}).get("lora")))
    check_optimizer(s.optim.optimizer, shards(pmesh, strategy), strategy.name)
    dataset, sampler = build_data(s.data, s.optim.accumulative_counts, pmesh.dp_size, pmesh.dp_rank)
    if len(dataset) == 0:
        raise EvotuneError(f"dataset_folder '{s.data.folder}': no pack of max_length tokens could be made")
    m = _build_model(s, dataset, pmesh, strategy, env)
    _check_save_merged(s, m)  # before training: the merge at the end needs the base's folder
    optimizer = build_optimizer(s.optim.optimizer, [p for p in m.module.parameters() if p.requires_grad],
                                env.device)
    n_steps = total_steps(s.schedule, sampler.steps_per_epoch)
    scheduler = build_scheduler(optimizer, [build(p) for p in s.schedule.phases], sampler.steps_per_epoch, n_steps)
    checkpointer = Checkpointer(
        work_dir, interval=s.checkpoint.interval, keep=s.checkpoint.keep, model=m.module, optimizer=optimizer,
        scheduler=scheduler, hf_config=m.llm.config, is_main=env.is_main,
        meta={"world_size": env.world_size, "dp_size": pmesh.dp_size, "sp_size": pmesh.sp_size,
              "strategy": strategy.name if pmesh.mesh is not None else "none",
              "model_source": ModelSource.of(m.llm), "optimizer": type(optimizer).__name__,
              "lora": _lora_record(m.module), "lora_shared_qkv_a": shares_qkv_a(m.llm),
              "data_fingerprint": f"{dataset.folder.fingerprint()}:{dataset.packed_length}:{len(dataset)}"})
    resumed = checkpointer.resume(s.runtime.resume, data_changed_ok=s.runtime.resume_data_changed)
    state = resumed.state if resumed else TrainState()
    if resumed and resumed.data_changed:  # --resume-data-changed=ok: the old order means nothing on new data
        if env.is_main:
            print(f"evotune: the training data changed since {resumed.path}: weights, optimizer and schedule "
                  "continue from it, the new data is read from its start")
    elif resumed:
        sampler.load_state_dict(state.sampler)
    else:
        if env.is_main:
            workdir.set_aside_run(work_dir)
        if s.runtime.load_from:  # initial weights; optimizer, schedule and data start fresh
            dcp.load_model_weights(s.runtime.load_from, m.module)

    loader = StepLoader(dataset, sampler, batch_size=s.data.batch_size, micro_num=s.optim.accumulative_counts,
                        num_workers=s.data.num_workers, pin_memory=env.device.type == "cuda",
                        collate=functools.partial(_collate, loss_reduction=s.optim.loss_reduction, pmesh=pmesh))
    metrics_path = os.path.join(work_dir, "metrics.jsonl")
    if env.is_main and resumed:
        for path in (metrics_path, os.path.join(work_dir, SAMPLES_FILE)):
            M.trim_jsonl(path, state.step)
    writer = M.MetricsWriter(metrics_path, enabled=env.is_main, append=resumed is not None)
    visualizer = build_visualizer(s.logging.visualizer, work_dir, enabled=env.is_main)
    progress = Progress(n_steps, enabled=env.is_main, start=state.step)
    tokenizer = build(s.model.tokenizer) if (s.eval.inputs or s.data.dataset_info) and s.model.tokenizer else None
    samples = build_sample_evaluator(s.eval, work_dir, tokenizer, is_main=env.is_main, append=resumed is not None,
                                     print_fn=progress.print, device=env.device)
    validator = Validator(s.eval, s.data, pmesh, env.device) if s.eval.valid_folder else None
    type_loss = TypeLoss(dataset.type_names, env.device) if dataset.type_names else None
    step_fn = _Stepper(s, m, optimizer, scheduler, env, pmesh, strategy, type_loss, stop, state)
    skips = SkipBudget(s.optim.max_consecutive_skips, s.optim.max_skipped_fraction, n_steps, state.skipped_steps,
                       lr=s.optim.lr)
    _print_start(progress, s, env, pmesh, strategy, dataset, sampler, n_steps, m.compute_dtype,
                 storage_summary(m.module), resumed)
    if s.data.dataset_info and tokenizer is not None:  # XTuner's DatasetInfoHook
        progress.print("evotune: the first pack, decoded ([[...]]: no loss)\n"
                       + render_document(pack_tokens(dataset[0]), tokenizer.decode, plain=True))
    checkpointer.restore_rng()  # last: the model and data were built with the seed's RNG

    last_loss = float("nan")
    try:
        if samples:
            samples.run(m.module, state.step)
        while state.step < n_steps:
            # the device is read at these steps only (docs/performance.md, "GPU speed by default")
            due = state.step + 1
            read = (due % s.logging.interval == 0 or due == n_steps or checkpointer.due(due)
                    or bool(validator and validator.due(due, n_steps)) or bool(samples and samples.due(due, n_steps)))
            for record in step_fn(loader, state, read):
                last_loss = record["loss"]
                if record["step"] == state.step and validator and validator.due(state.step, n_steps):
                    record.update(validator.run(m.module))
                writer.write(record)
                if visualizer:
                    visualizer.write(record)
                if record["step"] % s.logging.interval == 0 or record["step"] == n_steps:
                    progress.log(record)
                if record["skipped"]:
                    overflow = (f", float16 overflow: loss scale now {step_fn.scaler.scale:g}"
                                if record.get("overflow") else "")
                    progress.print(f"evotune: step {record['step']}: loss {record['loss']:.4g}, grad_norm "
                                   f"{record['grad_norm']:.4g}: not applied ({record['skipped_steps']} skipped in "
                                   f"all{overflow})")
                # a float16 overflow while the loss scale comes down is how dynamic scaling works, not divergence
                skips.step(record["step"], not record["skipped"] or record.get("overflow", False),
                           checkpointer.latest)
            progress.advance()
            if samples and samples.due(state.step, n_steps):
                samples.run(m.module, state.step)
            if not skips.streak:  # a checkpoint in a NaN streak would prune a good one for nothing
                checkpointer.maybe_save(state)
            if step_fn.stop_agreed:
                raise Preempted(stop.requested or "a signal to another rank", state.step,
                                checkpointer.maybe_save(state, last=True) or checkpointer.path(state.step))
        checkpointer.maybe_save(state, last=True)
    finally:
        loader.close()
        progress.close()
        writer.close()
        if visualizer:
            visualizer.close()

    if getattr(m.module, "lora_config", None) is not None:
        hf_dir, hf_kind = os.path.join(work_dir, "hf_adapter"), "PEFT adapter"  # + hf/ merged: printed there
        _export_adapter(m, s, hf_dir, env, merged_dir=os.path.join(work_dir, "hf") if s.checkpoint.save_merged
                        else None)
    else:
        hf_dir, hf_kind = os.path.join(work_dir, "hf"), "Hugging Face model"
        _export(m, s, hf_dir, env)
    return {"final_loss": last_loss, "steps": state.step, "hf_dir": hf_dir, "hf_kind": hf_kind,
            "metrics": metrics_path, "checkpoint": checkpointer.path(state.step)}


def _collate(packs: list[dict], loss_reduction: str, pmesh: ParallelMesh) -> dict:
    """One micro-batch: the packs as one row, this sequence-parallel rank's chunk of it."""
    return shard_row(packed_collate(packs, loss_reduction), pmesh.sp_rank, pmesh.sp_size)


def _print_start(progress: Progress, s: Settings, env: DistEnv, pmesh: ParallelMesh, strategy, dataset, sampler,
                 n_steps: int, dtype: torch.dtype, weights: str, resumed: Resumed | None) -> None:
    """The effective settings with their sources, the batch arithmetic, the process layout, the resume."""
    accum, batch_size, zero = s.optim.accumulative_counts, s.data.batch_size, s.parallel.deepspeed
    progress.print("evotune: settings (value, where it came from)\n" + s.format_table())
    global_batch = pmesh.dp_size * batch_size * accum
    progress.print(
        f"evotune: {len(dataset)} packs of {dataset.packed_length} tokens, {sampler.steps_per_epoch} steps/epoch, "
        f"{n_steps} steps; global batch {global_batch} packs = {global_batch * dataset.packed_length} tokens "
        f"(dp {pmesh.dp_size} x batch {batch_size} x accumulation {accum})"
    )
    progress.print(f"evotune: {env.world_size} process(es) on {env.device.type}, "
                   f"{'FSDP2 ' + strategy.name if pmesh.mesh is not None else 'no sharding'}, "
                   f"compute {dtype_name(dtype)}, {weights}"
                   + (f"; --deepspeed {zero.source}: ignored {', '.join(zero.ignored)}" if zero and zero.ignored
                      else ""))
    if resumed:
        progress.print(f"evotune: resumed from {resumed.path} in {resumed.load_time:.2f} s (step "
                       f"{resumed.state.step}, saved by {resumed.world_size} process(es))")
    elif s.runtime.resume:
        progress.print(f"evotune: --resume {s.runtime.resume}: no checkpoint in "
                       f"{dcp.checkpoints_dir(s.runtime.work_dir)}; starting from scratch")


@dataclass
class _Pending:
    """A step whose loss and gradient norm are still on the device."""

    step: int
    loss: torch.Tensor  # [1] float64, summed over the ranks
    grad_norm: torch.Tensor
    tokens: int
    flops: float
    lr: float
    data_time: float
    epoch: int | None
    type_sums: tuple | None  # this step's per-type CE sums (device) and token counts (host), or None


class _Stepper:
    """One optimizer step: the loader's next micro-batches, forward/backward, clip, step; the metrics records.

    No host synchronisation in the steady state: the step loss and gradient
    norm stay on the device and are read, with those of the steps before, only
    when the loop asks (every ``log_interval`` steps and at the steps that
    checkpoint, validate, generate samples or end). Between reads a non-finite
    step is not applied on the device: fused AdamW's ``found_inf`` (the tensor
    ``GradScaler`` uses) leaves weights, moments and step count as they were;
    the schedule still advances and the skip is counted at the next read.
    Per-type losses (``loss/<type>``) are kept per step and reduced at reads,
    so every line still has its own step's values. Steps are read
    every time where deferring is not possible: float16 loss scaling (its
    scale is updated on the host), an optimizer without ``found_inf``,
    ``log_interval = 1``, or a stop signal in a one-process run (with several
    ranks the stop is agreed at the next read, at most ``log_interval`` steps on).
    """

    def __init__(self, s: Settings, m: _Model, optimizer, scheduler, env: DistEnv, pmesh: ParallelMesh, strategy,
                 type_loss: TypeLoss | None, stop: StopSignals, state: TrainState):
        self.s, self.m, self.optimizer, self.scheduler = s, m, optimizer, scheduler
        self.env, self.pmesh, self.strategy, self.type_loss = env, pmesh, strategy, type_loss
        self.peak = M.peak_tflops(env.device)
        self.scaler = None
        if m.compute_dtype == torch.float16:
            self.scaler = LossScaler(**s.optim.loss_scale)
            self.scaler.load_state_dict(state.loss_scale)  # a resumed run goes on with its scale
        self.stop = stop
        self.stop_agreed = False  # some rank got a stop signal: every rank stops after this step
        self.deferrable = (self.scaler is None
                           and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
                           and bool(optimizer.defaults.get("fused")))
        self.pending: list[_Pending] = []
        self.window_start: float | None = None  # when the first step since the last read began

    def __call__(self, loader: StepLoader, state: TrainState, read: bool = True) -> list[dict]:
        """Advances ``state`` by one step; returns the records of the steps read now (none, or every step
        since the last read)."""
        env, pmesh, model = self.env, self.pmesh, self.m.module
        t0 = time.perf_counter()
        if self.window_start is None:
            self.window_start = t0
        step = next(loader)
        scale = self.scaler.scale if self.scaler else 1.0
        step_loss, tokens, doc_lengths = _train_step(
            model, step.micro_batches, env, pmesh, self.strategy, self.s.optim.accumulative_counts,
            self.s.optim.loss_reduction, self.type_loss, scale,
            functools.partial(forward_context, self.m.compute_dtype, env.device))
        if self.scaler:
            self.scaler.unscale_(model.parameters())
        grad_norm = clip_grad_norm_(model.parameters(), self.s.optim.max_norm)  # global, on the device
        flops = M.model_flops(*self.m.flops, doc_lengths) / pmesh.sp_size  # a share per sp rank
        loss = _all_reduce(step_loss.detach().double().reshape(1), pmesh)  # the global loss, on the device
        state.step += 1
        state.sampler = step.sampler_state
        type_sums = None
        if self.type_loss:  # this step's share, set aside until the read
            type_sums = (self.type_loss.sums.clone(), self.type_loss.counts.copy())
            self.type_loss.sums.zero_()
            self.type_loss.counts[:] = 0
        self.pending.append(_Pending(state.step, loss, grad_norm, tokens, flops, self.scheduler.get_last_lr()[0],
                                     step.data_time, step.sampler_state.get("epoch"), type_sums))
        # a stop signal is read at once in one process; ranks must read at the same steps (a collective)
        alone = pmesh.dp_size * pmesh.sp_size == 1
        if not (read or not self.deferrable or (alone and self.stop.requested is not None)):
            finite = torch.isfinite(loss[0]) & torch.isfinite(grad_norm)
            self.optimizer.found_inf = (~finite).float()  # a NaN/inf step is not applied (on the device)
            self.optimizer.step()
            del self.optimizer.found_inf
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return []

        records = self._read(state)
        current = records[-1]
        skipped = current["skipped"]
        if not skipped:  # a NaN/inf step is not applied: the weights stay the last finite ones
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:  # inf/NaN gradients of a finite loss: the scale was too high (unless already below 1)
            current.update(loss_scale=scale, overflow=skipped and math.isfinite(current["loss"]) and scale > 1.0)
            self.scaler.update(skipped)
            state.loss_scale = self.scaler.state_dict()
        per_step = (time.perf_counter() - self.window_start) / len(records)  # one wall-clock window, shared
        self.window_start = None
        for record in records:
            record["step_time"] = per_step
            record["tgs"] = record.pop("_tokens") / env.world_size / per_step
            flops = record.pop("_flops")
            if self.peak:
                record["mfu"] = flops / env.world_size / per_step / (self.peak * 1e12)
        return records

    def _read(self, state: TrainState) -> list[dict]:
        """One read of every pending step's loss and gradient norm (and, over ranks, tokens, FLOPs and
        the stop flag, in the same reduction); updates ``state``'s counts and ``stop_agreed``."""
        pending, self.pending = self.pending, []
        device = self.env.device
        host = torch.tensor([[p.tokens, p.flops, 0.0] for p in pending], dtype=torch.float64)
        host[-1, 2] = float(self.stop.requested is not None)
        if self.pmesh.dp_size * self.pmesh.sp_size > 1:
            host = _all_reduce(host.to(device), self.pmesh)
        values = torch.cat([torch.cat([p.loss for p in pending]).unsqueeze(1),
                            torch.stack([p.grad_norm.double() for p in pending]).unsqueeze(1),
                            host.to(device)], dim=1).tolist()  # synchronises with the device
        self.stop_agreed = values[-1][4] > 0
        records = []
        for p, (loss, grad_norm, tokens, flops, _) in zip(pending, values):
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            state.skipped_steps += skipped
            state.consumed_tokens += int(tokens)
            records.append({
                "step": p.step, "loss": loss / self.pmesh.dp_size, "lr": p.lr, "grad_norm": grad_norm,
                "skipped": skipped, "skipped_steps": state.skipped_steps, "tokens": state.consumed_tokens,
                "_tokens": tokens, "_flops": flops, "data_time": p.data_time, "epoch": p.epoch,
            })
            if p.type_sums is not None:  # all ranks: one all-reduce per step read
                self.type_loss.sums.copy_(p.type_sums[0])
                self.type_loss.counts[:] = p.type_sums[1]
                records[-1].update(self.type_loss.reduce())
        return records


def _train_step(model, micro_batches: list[dict], env: DistEnv, pmesh: ParallelMesh, strategy, accum: int,
                loss_reduction: str, type_loss: TypeLoss | None = None, grad_scale: float = 1.0,
                forward=contextlib.nullcontext):
    """Forward/backward over the step's micro-batches; returns (loss tensor, tokens, doc lengths) of this rank.
    ``grad_scale``: float16 loss scaling (the gradients come out multiplied by it; the loss returned is not);
    ``forward()``: the context each forward runs in (:func:`forward_context`)."""
    if loss_reduction == "token":
        n_loss = float(sum(mb["num_loss_tokens"] for mb in micro_batches))
        if pmesh.dp_size * pmesh.sp_size > 1:  # the global count, kept on the device
            n_loss = _all_reduce(torch.tensor(n_loss, dtype=torch.float64, device=env.device), pmesh)
            scale = pmesh.dp_size / n_loss.clamp(min=1.0).float()
        else:
            scale = 1.0 / max(n_loss, 1.0)
    else:
        scale = 1.0 / accum
    total = torch.zeros((), dtype=torch.float32, device=env.device)
    tokens, doc_lengths = 0, []
    for i, mb in enumerate(micro_batches):
        set_micro_batch(model, strategy, last=i == len(micro_batches) - 1)
        inputs = model_inputs(mb, env.device, pmesh.sp_group)
        with forward():
            if type_loss:
                loss, group_sums = model(**inputs, **type_loss.model_inputs(mb))
                type_loss.add(group_sums, mb)
            else:
                loss = model(**inputs)
        loss = loss.float() * scale
        (loss * (pmesh.sp_size * grad_scale)).backward()
        total += loss.detach()
        tokens += mb["num_tokens"]
        doc_lengths.extend(mb["doc_lengths"].tolist())
    return total, tokens, doc_lengths  # the loss stays on the device (read by _Stepper._read)


def _lora_record(module) -> dict | None:
    """The adapter_config.json of a LoRA run (trainer_state.json's ``lora``: ``convert pth_to_hf`` writes the
    adapter from it), None for a full fine-tune."""
    config = getattr(module, "lora_config", None)
    if config is None:
        return None
    source = ModelSource.of(module.llm)
    return adapter_config(config, source.path if source else None)


def _check_save_merged(s: Settings, m: _Model) -> None:
    """``save_merged`` merges the exported adapter into the base's folder (:func:`merge_adapter`, as
    ``evotune convert merge``): refused at start where that cannot work. (Without ``lora=`` it is refused
    with the settings, evotune/settings.py.)"""
    if not s.checkpoint.save_merged or getattr(m.module, "lora_config", None) is None:
        return
    where = f"save_merged=True ({s.sources['checkpoint.save_merged']})"
    source = ModelSource.of(m.llm)
    if source is None or source.path is None:
        raise EvotuneError(f"{where} merges into the base's folder, but the model was not loaded from one "
                           "(llm=dict(type=load_model, path=...)); remove save_merged")
    if source.format == "internevo":
        raise EvotuneError(f"{where}: the base {source.path} is an InternEvo checkpoint, which evotune convert merge "
                           "does not merge into; remove save_merged, convert the base with 'evotune convert "
                           "internevo2hf' and run 'evotune convert merge' on that folder and hf_adapter/")
    layout = "internlm2" if source.format == "internlm2" else "huggingface"
    if s.checkpoint.save_format not in (None, layout):
        raise EvotuneError(f"{where} writes hf/ in the base's {layout} layout from an adapter in that layout, but "
                           f"save_format={s.checkpoint.save_format!r} ({s.sources['checkpoint.save_format']}) "
                           "writes hf_adapter/ in another; remove one of them")


def _export_adapter(m: _Model, s: Settings, out_dir: str, env: DistEnv, merged_dir: str | None = None) -> None:
    """Gather the adapter (rank 0, CPU) and write it as a PEFT directory in the base's layout (docs/lora.md);
    with ``merged_dir`` (``save_merged``) also the base + adapter merged there, read from the base's folder
    as ``evotune convert merge`` does (for QLoRA: the unquantised base)."""
    state = get_model_state_dict(m.module, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True,
                                                                  cpu_offload=dist.is_initialized()))
    if env.is_main:
        source = ModelSource.of(m.llm)
        config = m.llm.config
        export_adapter(adapter_modules({k.removeprefix("llm."): v for k, v in state.items()}),
                       _lora_record(m.module), out_dir, source_format=source.format if source else None,
                       heads=config.num_attention_heads,
                       kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                       save_format=s.checkpoint.save_format, overwrite=True)
        if merged_dir is not None:
            merge_adapter(source.path, out_dir, merged_dir, overwrite=True)
            print(f"evotune: merged model (base {source.path} + adapter) in {merged_dir}")
    if dist.is_initialized():
        dist.barrier()


def _export(m: _Model, s: Settings, hf_dir: str, env: DistEnv) -> None:
    """Gather the full weights (rank 0, on the CPU) and write the HF directory in the source's layout."""
    state = get_model_state_dict(m.module, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=dist.is_initialized()))
    tokenizer = tokenizer_path(s.model.tokenizer)
    if tokenizer is not None:  # a hub id: every rank takes part (rank 0 resolves, the others wait)
        tokenizer = hub.resolve(tokenizer, tokenizer_only=True)
    if env.is_main:
        save_hf({k.removeprefix("llm."): v for k, v in state.items()}, hf_dir, config=m.llm.config,
                source=ModelSource.of(m.llm), save_format=s.checkpoint.save_format,
                tokenizer_path=tokenizer, dtype=m.export_dtype, overwrite=True)
    if dist.is_initialized():
        dist.barrier()
