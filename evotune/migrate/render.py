"""Write the evotune config text of a translation, in the five-part layout of evotune/configs/.

Part 1 holds the settings, each with a comment naming the InternEvo key (and
line) it comes from; parts 2 to 5 build the model, data, optimizer, schedule and
runtime from them, as the shipped configs do. The header states both sides of
the batch arithmetic (evotune/migrate/batch.py) and the launch commands.
"""

from __future__ import annotations

import os
from typing import Any

from evotune.migrate.batch import BatchPlan
from evotune.migrate.translate import Translation

_BAR = "#" * 71
OPTIONAL = ("dataset_weights", "valid_folder", "evaluation_freq")  # written only when they have a value


def _part(title: str) -> str:
    return f"{_BAR}\n#{title:^69}#\n{_BAR}"


def thousands(n: int) -> str:
    return f"{n:,}"


def _assign(name: str, value: Any, comment: str) -> str:
    return f"{name} = {value!r}  # {comment}"


def render(source: str, translation: Translation, plan: BatchPlan, assumptions: list[str]) -> str:
    """The evotune config text for the InternEvo config at ``source``."""
    s = translation.settings
    ie = plan.internevo

    def line(name: str) -> str:
        value, comment = s[name]
        return _assign(name, value, comment)

    optional = [n for n in OPTIONAL if n in s and s[n][0] is not None]
    flag = f" --deepspeed {translation.deepspeed}" if translation.deepspeed else ""
    head = [
        f"# Migrated from the InternEvo config {os.path.basename(source)} by `evotune migrate`.",
        "# Every translated line names the InternEvo key it comes from; see docs/migrating-from-internevo.md.",
        "#",
        f"# InternEvo: {ie.world_size} GPUs, tensor {ie.tensor} ({ie.mode}) x pipeline {ie.pipeline} -> "
        f"data parallel {ie.data_parallel_size};",
        f"#   {ie.data_parallel_size} dp x {plan.micro_num} micro_num x {plan.micro_bsz} micro_bsz x {plan.seq_len} "
        f"seq_len = {thousands(plan.internevo_tokens_per_step)} tokens per optimizer step.",
        f"# evotune:   {plan.world_size} GPUs / sequence_parallel_size {plan.sequence_parallel_size} -> "
        f"data parallel {plan.data_parallel_size};",
        f"#   {plan.data_parallel_size} dp x {plan.batch_size} batch_size x {plan.accumulative_counts} "
        f"accumulative_counts x {plan.max_length} max_length = {thousands(plan.tokens_per_step)} tokens per "
        f"optimizer step.",
        *[f"# Assumed: {a}" for a in assumptions],
        "#",
        "# Launch (one node of 8 GPUs shown; set NNODES/NODE_RANK/ADDR/PORT or use --launcher slurm for more):",
        f"#   NPROC_PER_NODE=8 evotune train THIS_FILE.py{flag}",
        f"#   srun -n {plan.world_size} evotune train THIS_FILE.py --launcher slurm{flag}",
        "from evotune import (AdamW, CosineAnnealingLR, LinearLR, SequenceParallelSampler, SupervisedFinetune,",
        "                     build_packed_dataset, load_intern_repo_tokenized_dataset, load_model, load_tokenizer)",
        "",
    ]
    eta_min, eta_min_comment = s["_eta_min"]
    private = [_assign("_eta_min", eta_min, f"{eta_min_comment} (absolute)")]
    schedule_total = "max_steps"
    if "_schedule_steps" in s:
        private.append(line("_schedule_steps"))
        schedule_total = "_schedule_steps"
    private.append(f"_warmup_steps = int({schedule_total} * warm_up_ratio)  "
                   f"# InternEvo: int(total_steps * warmup_ratio)")
    parts = [
        _part("PART 1  Settings"),
        "# Model",
        *map(line, ("pretrained_model_name_or_path", "use_varlen_attn", "torch_dtype", "activation_checkpointing")),
        "",
        "# Data",
        *map(line, ("dataset_folder", "data_order_path", "min_length", "max_length", "max_length_per_sample",
                    "pack_sample_into_one", "seed", *optional)),
        "",
        "# Scheduler & Optimizer",
        *map(line, ("batch_size", "accumulative_counts", "max_steps", "lr", "betas", "eps", "weight_decay",
                    "max_norm", "warm_up_ratio", "label_smoothing", "loss_reduction")),
        *private,
        "",
        "# Parallel",
        line("sequence_parallel_size"),
        "",
        "# Save",
        line("save_steps"),
        line("save_total_limit"),
        "",
        _part("PART 2  Model & Tokenizer"),
        "tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)",
        "",
        "model = dict(",
        "    type=SupervisedFinetune,",
        "    use_varlen_attn=use_varlen_attn,",
        "    activation_checkpointing=activation_checkpointing,",
        "    label_smoothing=label_smoothing,",
        "    llm=dict(type=load_model, path=pretrained_model_name_or_path, dtype=torch_dtype))",
        "",
        _part("PART 3  Dataset & Dataloader"),
        "train_dataset = dict(",
        "    type=build_packed_dataset,",
        "    dataset_cfg=dict(",
        "        type=load_intern_repo_tokenized_dataset,",
        "        data_order_path=data_order_path,",
        "        folder=dataset_folder,",
        "        min_length=min_length,",
        "        file_type='.bin'),",
        "    packed_length=max_length,",
        "    max_length_per_sample=max_length_per_sample,",
        "    pack_sample_into_one=pack_sample_into_one,",
        *(["    dataset_weights=dataset_weights,"] if "dataset_weights" in optional else []),
        "    seed=seed)",
        "",
        "train_dataloader = dict(",
        "    batch_size=batch_size,",
        "    num_workers=0,",
        "    sampler=dict(type=SequenceParallelSampler, shuffle=True))",
        "",
        _part("PART 4  Scheduler & Optimizer"),
        "optim_wrapper = dict(",
        "    optimizer=dict(type=AdamW, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),",
        "    clip_grad=dict(max_norm=max_norm),",
        "    accumulative_counts=accumulative_counts,",
        "    dtype=torch_dtype)",
        "",
        "# InternEvo's FineTuneCosineAnnealingWarmupLR, step for step: lr * (step + 1) / W for step < W,",
        "# then cosine from lr to eta_min over the remaining steps (begin/end in optimizer steps).",
        "param_scheduler = ([",
        "    dict(type=LinearLR, start_factor=1 / _warmup_steps, begin=0, end=_warmup_steps - 1, by_epoch=False),",
        "] if _warmup_steps else []) + [",
        f"    dict(type=CosineAnnealingLR, eta_min=_eta_min, begin=_warmup_steps, end={schedule_total}, "
        "by_epoch=False),",
        "]",
        "",
        _part("PART 5  Runtime"),
        "train_cfg = dict(max_steps=max_steps)",
        "checkpoint = dict(interval=save_steps, max_keep_ckpts=save_total_limit)",
        "log_interval = 1",
        "randomness = dict(seed=None)",
    ]
    if s.get("work_dir", (None,))[0]:
        parts.append(line("work_dir"))
    return "\n".join(head + parts) + "\n"
