"""The training loop, readable top to bottom.

``train(cfg, work_dir)`` builds everything from the config, then for each
optimizer step: take ``accumulative_counts`` micro-batches, run forward and
backward on each with InternEvo's loss weights, clip, step, log. At the end the
model is exported as a Hugging Face directory in ``<work_dir>/hf``.

Loss weights (DESIGN.md §5): the collate function gives each supervised token
its weight inside its micro-batch; the loop scales by ``1 / accumulative_counts``
(``loss_reduction='pack'``, InternEvo's objective) or by
``dp / global supervised tokens of the step`` (``'token'``). Gradients are then
averaged over data-parallel ranks, so both are exact global objectives.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from evotune.config import build
from evotune.data.collate import packed_collate
from evotune.data.loader import StepLoader
from evotune.errors import EvotuneError
from evotune.parallel.env import DistEnv
from evotune.train import metrics as M
from evotune.train.progress import Progress
from evotune.train.schedule import build_scheduler

MODEL_INPUTS = ("input_ids", "position_ids", "loss_index", "loss_labels", "loss_weight",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


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


def _all_reduce(value: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(value, op=op)
    return value


def build_data(cfg: dict, dp_size: int, dp_rank: int):
    """The packed dataset and this rank's sampler, from the config."""
    dataset = build(cfg["train_dataset"])
    loader_cfg = cfg.get("train_dataloader", {})
    micro_num = cfg.get("batch_size", 1) * cfg.get("accumulative_counts", 1)
    sampler = build(loader_cfg.get("sampler", {"type": "SequenceParallelSampler"}),
                    dataset=dataset, dp_size=dp_size, dp_rank=dp_rank, micro_num=micro_num)
    return dataset, sampler


def check_vocab(dataset, llm, where: str) -> None:
    vocab = llm.get_input_embeddings().num_embeddings
    max_id = getattr(dataset, "max_token_id", None)
    if max_id is not None and max_id >= vocab:
        raise EvotuneError(
            f"{where}: token id {max_id} does not fit the model's vocabulary of {vocab}; "
            f"the data was tokenized for another model (check pretrained_model_name_or_path)"
        )


def total_steps(cfg: dict, steps_per_epoch: int) -> int:
    if cfg.get("max_steps"):
        return int(cfg["max_steps"])
    epochs = cfg.get("max_epochs", cfg.get("train_cfg", {}).get("max_epochs", 1))
    return max(1, int(round(epochs * steps_per_epoch)))


def train(cfg: dict, work_dir: str, env: DistEnv, seed: int | None = None) -> dict:
    """Run the whole training; returns a summary (final loss, steps, paths)."""
    seed = seed if seed is not None else (cfg.get("randomness") or {}).get("seed") or cfg.get("seed") or 0
    seed_everything(seed)
    os.makedirs(work_dir, exist_ok=True)
    dp_size, dp_rank = env.world_size, env.rank
    accum = int(cfg.get("accumulative_counts", 1))
    batch_size = int(cfg.get("batch_size", 1))
    loss_reduction = cfg.get("loss_reduction", "pack")

    dataset, sampler = build_data(cfg, dp_size, dp_rank)
    if len(dataset) == 0:
        raise EvotuneError(f"dataset_folder '{cfg.get('dataset_folder')}': no pack of max_length tokens could be made")
    model = build(cfg["model"])
    check_vocab(dataset, model.llm, f"dataset_folder '{cfg.get('dataset_folder')}'")
    model.to(env.device)
    model.train()

    optim_cfg = cfg["optim_wrapper"]
    optimizer = build(optim_cfg["optimizer"], params=[p for p in model.parameters() if p.requires_grad])
    max_norm = (optim_cfg.get("clip_grad") or {}).get("max_norm")
    n_steps = total_steps(cfg, sampler.steps_per_epoch)
    scheduler = build_scheduler(optimizer, [build(p) for p in cfg.get("param_scheduler", [])],
                                sampler.steps_per_epoch, n_steps)

    state = TrainState()
    loader = StepLoader(dataset, sampler, batch_size=batch_size, micro_num=accum,
                        collate=lambda packs: packed_collate(packs, loss_reduction),
                        pin_memory=env.device.type == "cuda")
    n_matmul = M.matmul_params(model.llm)
    n_layers, attn_dim = M.attention_dim(model.llm)
    peak = M.peak_tflops(env.device)
    log_interval = int(cfg.get("log_interval", 1))
    writer = M.MetricsWriter(os.path.join(work_dir, "metrics.jsonl"), enabled=env.is_main)
    progress = Progress(n_steps, enabled=env.is_main)
    if env.is_main:
        global_batch = dp_size * batch_size * accum
        progress.print(
            f"evotune: {len(dataset)} packs of {dataset.packed_length} tokens, {sampler.steps_per_epoch} steps/epoch, "
            f"{n_steps} steps; global batch {global_batch} packs = {global_batch * dataset.packed_length} tokens "
            f"(dp {dp_size} x batch {batch_size} x accumulation {accum})"
        )

    last_loss = float("nan")
    try:
        while state.step < n_steps:
            t0 = time.perf_counter()
            step = next(loader)
            step_loss, tokens, doc_lengths = _train_step(model, step.micro_batches, env, accum, loss_reduction)
            grad_norm = _clip(model, max_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            stats = torch.tensor([step_loss, tokens, M.model_flops(n_matmul, n_layers, attn_dim, doc_lengths)],
                                 dtype=torch.float64)
            _all_reduce(stats, env)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            state.step += 1
            state.consumed_tokens += int(stats[1])
            state.sampler = step.sampler_state
            last_loss = float(stats[0]) / env.world_size
            tgs = float(stats[1]) / env.world_size / elapsed
            record = {
                "step": state.step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": state.consumed_tokens, "tgs": tgs, "data_time": step.data_time, "step_time": elapsed,
                "epoch": getattr(sampler, "epoch", None),
            }
            if peak:
                record["mfu"] = float(stats[2]) / env.world_size / elapsed / (peak * 1e12)
            writer.write(record)
            if state.step % log_interval == 0 or state.step == n_steps:
                progress.log(record)
            progress.advance()
    finally:
        loader.close()
        progress.close()
        writer.close()

    hf_dir = os.path.join(work_dir, "hf")
    _export(model, cfg, hf_dir, env)
    return {"final_loss": last_loss, "steps": state.step, "hf_dir": hf_dir,
            "metrics": os.path.join(work_dir, "metrics.jsonl")}


def _train_step(model, micro_batches: list[dict], env: DistEnv, accum: int, loss_reduction: str):
    """Forward/backward over the step's micro-batches; returns (loss, tokens, doc lengths)."""
    if loss_reduction == "token":
        n_loss = torch.tensor(float(sum(mb["num_loss_tokens"] for mb in micro_batches)), dtype=torch.float64)
        _all_reduce(n_loss, env)
        scale = env.world_size / max(float(n_loss), 1.0)
    else:
        scale = 1.0 / accum
    total = torch.zeros((), dtype=torch.float32, device=env.device)
    tokens, doc_lengths = 0, []
    for mb in micro_batches:
        inputs = {k: (mb[k].to(env.device, non_blocking=True) if isinstance(mb[k], torch.Tensor) else mb[k])
                  for k in MODEL_INPUTS}
        loss = model(**inputs) * scale
        loss.backward()
        total += loss.detach()
        tokens += mb["num_tokens"]
        doc_lengths.extend(mb["doc_lengths"].tolist())
    return float(total), tokens, doc_lengths


def _clip(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _export(model, cfg: dict, hf_dir: str, env: DistEnv) -> None:
    from evotune.checkpoint.hf import save_hf

    if env.is_main:
        tokenizer_path = (cfg.get("tokenizer") or {}).get("path") if isinstance(cfg.get("tokenizer"), dict) else None
        save_hf(model.llm, hf_dir, tokenizer_path=tokenizer_path, save_format=cfg.get("save_format"),
                overwrite=True)
