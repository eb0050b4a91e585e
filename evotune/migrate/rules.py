"""What each InternEvo key becomes, as tables: the data that evotune/migrate/translate.py walks.

Every InternEvo key gets one row in the printed table with a status:

* *mapped*: same meaning in evotune;
* *changed meaning*: translated, but something differs (the note says what);
* *not needed*: a performance or infrastructure knob without an effect on the
  mathematics of training (communication overlap, bucket sizes, alerts ...);
* *unsupported*: it changes training and evotune has no equivalent (left out).

The tables:

* :data:`DATA`, :data:`MODEL`, :data:`CHECKPOINT`, :data:`OPTIMIZER`: one :class:`Rule` per
  InternEvo key: its row, and the evotune setting it writes (value transform, comment);
* :data:`DERIVED`: evotune settings computed from several InternEvo keys or the batch plan;
* :data:`FIXED`: evotune settings InternEvo has no key for;
* :data:`TOP_NOT_NEEDED`, :data:`KEY_NOT_NEEDED`: keys reported as not needed, with why;
* :data:`MODEL_DIMS`, :data:`TENSOR_MODE_NOTES`: data of the multi-key decisions that stay code in
  translate.py (where the model comes from, its dimensions, the parallel layout).

The values InternEvo uses for absent keys are those of its ``launch.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evotune.migrate.batch import BatchPlan
from evotune.migrate.read import InternEvoConfig

MAPPED = "mapped"
CHANGED = "changed meaning"
NOT_NEEDED = "not needed"
UNSUPPORTED = "unsupported"

EMPTY = (None, False, "", {}, [])  # values that disable an InternEvo key
REMOTE_PREFIXES = ("boto3:", "oss2:", "volc:", "s3:")


@dataclass(frozen=True)
class Verdict:
    """The row of one present InternEvo key."""

    status: str
    note: str = ""
    target: str | None = None  # the evotune name in the row; None: the rule's


@dataclass(frozen=True)
class Rule:
    """One InternEvo key: its row in the table and the evotune setting it writes.

    A present key gets the row ``judge`` returns (None: no row, the key is reported with the
    leftovers), or *mapped* to ``target or setting`` with ``note`` when there is no ``judge``.
    ``always``: the row is made from ``default`` when the key is absent too. The setting is
    ``value(key's value)`` commented with the key and its line; when the key is absent it is
    written from ``default`` only if ``absent`` says so (the comment after the key name).
    """

    key: str
    setting: str = ""
    note: str = ""
    default: Any = None
    absent: str | None = None
    target: str = ""
    judge: Callable[[Any, InternEvoConfig, BatchPlan], Verdict | None] | None = None
    value: Callable[[Any], Any] | None = None
    always: bool = False


def local_path(path: Any) -> Any:
    """InternEvo's ``local:/x`` is the file system path ``/x``."""
    return path[len("local:"):] if isinstance(path, str) and path.startswith("local:") else path


def is_remote(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(REMOTE_PREFIXES)


def _file_system_folder(path: Any) -> str | None:
    """``ckpt.save_ckpt_folder`` as evotune's work_dir: None for an object store or None."""
    folder = local_path(path)
    return None if is_remote(folder) or not folder else folder


def _validation_folder(cfg: InternEvoConfig) -> Any:
    return local_path(cfg.get("data.valid_folder")) or None


def _dtype_name(value: Any) -> str:
    return "float16" if value is None else str(value).removeprefix("torch.")


def _evotune_dtype(value: Any) -> str:
    """float16 needs loss scaling: evotune trains it in bfloat16; TF32 is float32 with TF32 matmuls."""
    name = _dtype_name(value)
    return name if name in ("bfloat16", "float32") else "float32" if name == "tf32" else "bfloat16"


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# -- judges: the row of a key whose status depends on its value ------------------------------------

def _micro_num(value, cfg, plan):
    same = plan.data_parallel_size == plan.internevo.data_parallel_size
    note = (f"{plan.packs_per_step} packs per step: dp {plan.data_parallel_size} x accumulative_counts "
            f"{plan.accumulative_counts}")
    if same:
        return Verdict(MAPPED, note)
    return Verdict(CHANGED, note + f" (InternEvo dp {plan.internevo.data_parallel_size} x micro_num {value})")


def _data_type(value, cfg, plan):
    if value == "tokenized":
        return Verdict(MAPPED, "InternEvo tokenized folders", "load_intern_repo_tokenized_dataset")
    return Verdict(UNSUPPORTED, f"'{value}' data: tokenize it first with `evotune tokenize` and point "
                                f"dataset_folder at the output's train/ folder")


def _train_folder(value, cfg, plan):
    if local_path(value) is None:
        return Verdict(UNSUPPORTED, "None trains InternEvo on random tokens; set dataset_folder to an InternEvo "
                                    "tokenized folder")
    return Verdict(MAPPED)


def _min_length_dict(value, cfg, plan):
    if value:
        return Verdict(UNSUPPORTED, "per-type minimum lengths: evotune has one min_length for all types")
    return None


def _micro_bsz(value, cfg, plan):
    return Verdict(MAPPED, f"max_length = seq_len * micro_bsz = {plan.max_length} (InternEvo's packed_length)")


def _dataset_weights(value, cfg, plan):
    if value:
        return Verdict(MAPPED, "share of packs per named sub-dataset")
    return Verdict(NOT_NEEDED, "empty", "")


def _valid_folder(value, cfg, plan):
    if local_path(value):
        return Verdict(MAPPED, "one validation set per leaf folder")
    return Verdict(NOT_NEEDED, "None: InternEvo validates on random tokens; evotune skips validation", "")


def _valid_every(value, cfg, plan):
    if _validation_folder(cfg) and value:
        return Verdict(MAPPED)
    return Verdict(NOT_NEEDED, "no validation folder" if value else "0: disabled", "")


def _unsupported_unless_empty(note: str):
    def judge(value, cfg, plan):
        return Verdict(NOT_NEEDED, "empty") if value in ("", None) else Verdict(UNSUPPORTED, note)
    return judge


def _use_packed_dataset(value, cfg, plan):
    if value in (True, None):
        return Verdict(NOT_NEEDED, "evotune always packs")
    return Verdict(UNSUPPORTED, "evotune always packs documents")


def _model_dtype(value, cfg, plan):
    name = _dtype_name(value)
    if name in ("bfloat16", "float32"):
        return Verdict(MAPPED)
    if name == "tf32":
        return Verdict(CHANGED, "float32 (TF32 matmuls are PyTorch's default on CUDA)")
    return Verdict(CHANGED, f"{name} with loss scaling -> bfloat16 (same range as float32, no loss scale)")


def _grad_scaler(value, cfg, plan):
    if _dtype_name(cfg.get("model.dtype")) not in ("bfloat16", "float32", "tf32"):
        return Verdict(CHANGED, "fp16 loss scaling dropped: training runs in bfloat16")
    return Verdict(NOT_NEEDED, TOP_NOT_NEEDED["grad_scaler"])


def _activation_checkpointing(value, cfg, plan):
    if value in (True, False, 0, 1):
        return Verdict(MAPPED)
    return Verdict(CHANGED, f"a fraction ({value}) of layers -> every layer is checkpointed")


def _num_experts(value, cfg, plan):
    if value in (1, None):
        return Verdict(NOT_NEEDED, "one expert: a dense model")
    return Verdict(UNSUPPORTED, "mixture-of-experts models are not supported")


def _embed_grad_scale(value, cfg, plan):
    if value == 1:
        return Verdict(NOT_NEEDED, "1: no scaling")
    return Verdict(UNSUPPORTED, "embedding gradient scaling")


def _post_layer_norm(value, cfg, plan):
    if value:
        return Verdict(UNSUPPORTED, "pre-norm models only")
    return Verdict(NOT_NEEDED, "False: pre-norm, as the checkpoint")


def _checkpoint_every(value, cfg, plan):
    if _finite_number(value):
        return Verdict(MAPPED)
    return Verdict(CHANGED, "inf -> only at the end")


def _save_ckpt_folder(value, cfg, plan):
    folder = local_path(value)
    if is_remote(folder):
        return Verdict(UNSUPPORTED, "object stores: use a file system path")
    if folder:
        return Verdict(MAPPED)
    return Verdict(NOT_NEEDED, "None: ./work_dirs/<config name>", "")


def _beta2_schedule(value, cfg, plan):
    c = cfg.get("adam.adam_beta2_c", cfg.get("beta2_scheduler.c", 0))
    if c:
        return Verdict(UNSUPPORTED, f"a beta2 schedule (c={c}): evotune keeps beta2 fixed")
    return Verdict(NOT_NEEDED, "0: beta2 stays constant")


def _clip_grad_norm(value, cfg, plan):
    return Verdict(MAPPED, "" if value else "0: no clipping")


def _schedule_total_steps(value, cfg, plan):
    if int(value) == int(cfg.get("data.total_steps", 50000)):
        return Verdict(MAPPED, "", "max_steps")
    return Verdict(MAPPED, "differs from data.total_steps: kept for the schedule", "_schedule_steps")


def _init_steps(value, cfg, plan):
    if value:
        return Verdict(UNSUPPORTED, f"{value} steps at lr 0 before the warm-up: evotune's schedule starts warming "
                                    f"up at step 0")
    return Verdict(NOT_NEEDED, "0: warm-up starts at step 0")


# -- the per-key tables, in the order of the printed table -----------------------------------------

DATA = (
    Rule("data.micro_num", default=1, always=True, target="accumulative_counts", judge=_micro_num),
    Rule("data.type", default="tokenized", judge=_data_type),
    Rule("data.train_folder", target="dataset_folder", always=True, judge=_train_folder),
    Rule("data.min_length", "min_length", default=0, absent="(absent: InternEvo's default 0)"),
    Rule("data.min_length_dict", target="min_length", judge=_min_length_dict),
    Rule("data.seq_len", "max_length_per_sample", "longer segments are split into seq_len pieces", always=True),
    Rule("data.micro_bsz", target="max_length", always=True, judge=_micro_bsz),
    Rule("data.pack_sample_into_one", "pack_sample_into_one", default=False, value=bool, absent="(absent: False)"),
    Rule("data.seed", "seed", "the global pack order", default=1024,
         absent="(absent: InternEvo's default 1024): the global pack order"),
    Rule("data.dataset_weights", "dataset_weights", judge=_dataset_weights, value=lambda v: v or None),
    Rule("data.valid_folder", "valid_folder", judge=_valid_folder, value=lambda v: local_path(v) or None,
         absent="(absent)"),
    Rule("data.valid_every", target="evaluation_freq", default=0, judge=_valid_every),
    Rule("data.rampup_batch_size", judge=_unsupported_unless_empty(
        "a growing batch changes tokens per step over time: evotune keeps one batch size")),
    Rule("data.skip_batches", judge=_unsupported_unless_empty(
        "skipping batches: evotune resumes its own runs exactly with --resume")),
    Rule("data.use_packed_dataset", judge=_use_packed_dataset),
    Rule("data.total_steps", "max_steps", default=50000, value=int,
         absent="(absent: InternEvo's default 50000)"),
)

MODEL = (
    Rule("model.dtype", "torch_dtype", always=True, judge=_model_dtype, value=_evotune_dtype,
         absent="(absent: InternEvo's float16) -> bfloat16"),
    Rule("grad_scaler", judge=_grad_scaler),
    Rule("model.checkpoint", "activation_checkpointing", default=False, judge=_activation_checkpointing,
         value=bool, absent="(absent: False)"),
    Rule("model.num_experts", judge=_num_experts),
    Rule("model.embed_grad_scale", judge=_embed_grad_scale),
    Rule("model.apply_post_layer_norm", judge=_post_layer_norm),
)

CHECKPOINT = (
    Rule("ckpt.checkpoint_every", target="save_steps", judge=_checkpoint_every),
    Rule("ckpt.save_ckpt_folder", "work_dir", judge=_save_ckpt_folder, value=_file_system_folder),
)

OPTIMIZER = (
    Rule("adam.lr", "lr", default=1e-4, absent="(absent)"),
    Rule("adam.adam_eps", "eps", default=1e-8, absent="(absent)"),
    Rule("adam.weight_decay", "weight_decay", default=0.01, absent="(absent)"),
    Rule("adam.adam_beta1", target="betas"),
    Rule("adam.adam_beta2", target="betas"),
    Rule("adam.adam_beta2_c", judge=_beta2_schedule),
    Rule("beta2_scheduler.c", judge=_beta2_schedule),
    Rule("hybrid_zero_optimizer.clip_grad_norm", "max_norm", default=0.0, judge=_clip_grad_norm,
         value=lambda v: v or None, absent="(absent)"),
    Rule("loss.label_smoothing", "label_smoothing", default=0, absent="(absent: 0)"),
    Rule("lr_scheduler.total_steps", judge=_schedule_total_steps),
    Rule("lr_scheduler.warmup_ratio", "warm_up_ratio", "W = int(total_steps * ratio); lr * (step + 1) / W for "
                                                       "steps < W", default=0.0, absent="(absent: 0)"),
    Rule("lr_scheduler.eta_min", "_eta_min", "absolute minimum lr", default=0.0, absent="",
         target="param_scheduler[-1].eta_min"),
    Rule("lr_scheduler.init_steps", judge=_init_steps),
)


# -- settings computed from several keys or the plan: name -> (cfg, plan) -> (value, comment) or None --

def _dataset_folder(cfg, plan):
    folder = local_path(cfg.get("data.train_folder"))
    if folder is None:
        return "/path/to/your/dataset", f"{cfg.cite('data.train_folder')} was None"
    return folder, cfg.cite("data.train_folder")


def _max_length(cfg, plan):
    return plan.max_length, (f"{cfg.cite('data.seq_len')} * {cfg.cite('data.micro_bsz')} = {plan.seq_len} * "
                             f"{plan.micro_bsz} (InternEvo's packed_length)")


def _evaluation_freq(cfg, plan):
    every = cfg.get("data.valid_every", 0)
    return (int(every), cfg.cite("data.valid_every")) if _validation_folder(cfg) and every else None


def _accumulative_counts(cfg, plan):
    return plan.accumulative_counts, (f"{cfg.cite('data.micro_num')} = {plan.micro_num}: {plan.packs_per_step} "
                                      f"packs per step / dp {plan.data_parallel_size}")


def _save_steps(cfg, plan):
    every = cfg.get("ckpt.checkpoint_every")
    if cfg.has("ckpt.checkpoint_every") and _finite_number(every):
        return int(every), cfg.cite("ckpt.checkpoint_every")
    return (int(cfg.get("data.total_steps", 50000)),
            "ckpt.checkpoint_every absent or inf: save at the end (data.total_steps)")


def _betas(cfg, plan):
    return ((cfg.get("adam.adam_beta1", 0.9), cfg.get("adam.adam_beta2", 0.95)),
            f"({cfg.cite('adam.adam_beta1')}, {cfg.cite('adam.adam_beta2')})")


def _schedule_steps(cfg, plan):
    """InternEvo's schedule length when it differs from the training length."""
    total = int(cfg.get("data.total_steps", 50000))
    steps = int(cfg.get("lr_scheduler.total_steps", total))
    return None if steps == total else (steps, cfg.cite("lr_scheduler.total_steps"))


DERIVED: dict[str, Callable[[InternEvoConfig, BatchPlan], tuple[Any, str] | None]] = {
    "dataset_folder": _dataset_folder,
    "max_length": _max_length,
    "evaluation_freq": _evaluation_freq,
    "batch_size": lambda cfg, plan: (plan.batch_size, "evotune: packs per micro-batch per device (a pack already "
                                                      "holds micro_bsz sequences)"),
    "accumulative_counts": _accumulative_counts,
    "save_steps": _save_steps,
    "betas": _betas,
    "_schedule_steps": _schedule_steps,
}

FIXED: dict[str, tuple[Any, str]] = {
    "data_order_path": (None, "evotune: walk the folder in sorted order as InternEvo intends; see "
                              "`evotune data-order`"),
    "use_varlen_attn": (True, "model.use_flash_attn with data.pack_sample_into_one: attention stays inside each "
                              "cu_seqlens segment, as InternEvo's flash-attn path"),
    "save_total_limit": (-1, "evotune: keep every checkpoint, as InternEvo does"),
    "loss_reduction": ("pack", "evotune: InternEvo's objective, mean loss per pack / micro_num, averaged over dp"),
}

# -- keys without an effect on the mathematics -----------------------------------------------------

# Top-level InternEvo names that only steer infrastructure (alerts, cuDNN, logging).
TOP_NOT_NEEDED = {
    "model_type": "evotune reads the architecture from the checkpoint",
    "monitor": "Feishu alerts and light monitor are not part of evotune",
    "cudnn_deterministic": "no cuDNN kernels in a transformer's training step",
    "cudnn_benchmark": "no cuDNN kernels in a transformer's training step",
    "use_fp32_norm": "FSDP mixed precision keeps master weights in float32",
    "metric_dtype": "evotune computes metrics in float64",
    "enable_tb": "metrics go to <work_dir>/metrics.jsonl; `evotune plot` draws them",
    "tensorboard_folder": "metrics go to <work_dir>/metrics.jsonl; `evotune plot` draws them",
    "resume_tb_folder": "metrics go to <work_dir>/metrics.jsonl; `evotune plot` draws them",
    "alert_address": "alerts are not part of evotune",
    "selective_checkpoint": "activation checkpointing is per layer (activation_checkpointing)",
    "selective_checkpoint_offload": "activation checkpointing is per layer (activation_checkpointing)",
    "grad_scaler": "fp16 loss scaling: evotune trains in bfloat16 or float32, which need none",
}
# Top-level InternEvo sections whose keys the tables above and translate.py go through.
SECTIONS = {"data", "model", "parallel", "ckpt", "adam", "lr_scheduler", "beta2_scheduler", "loss",
            "hybrid_zero_optimizer"}

# Keys whose value does not change the mathematics of training.
KEY_NOT_NEEDED = {
    "data.valid_micro_num": "evotune validates every pack of valid_folder",
    "data.empty_cache_and_diag_interval": "a CUDA cache/diagnosis interval",
    "data.diag_outlier_ratio": "a straggler diagnosis threshold",
    "data.num_worker": "evotune reads packs from memory-mapped files in a prefetch thread",
    "data.fixed_random_dataset_seqlen": "applies to InternEvo's random dataset only",
    "data.use_shm": "evotune memory-maps its token index",
    "data.packed_length": "InternEvo overwrites it with seq_len * micro_bsz",
    "data.gradient_accumulation": "InternEvo sets it to micro_num",
    "hybrid_zero_optimizer.overlap_sync_grad": "FSDP2 overlaps communication by itself",
    "hybrid_zero_optimizer.overlap_sync_param": "FSDP2 overlaps communication by itself",
    "hybrid_zero_optimizer.reduce_bucket_size": "FSDP2 reduces per layer",
    "hybrid_zero_optimizer.use_split_tensor_optim": "an InternEvo optimizer implementation detail",
    "hybrid_zero_optimizer.zero_overlap_communication": "FSDP2 overlaps communication by itself",
    "loss.op_type": "evotune always uses its chunked cross-entropy (same values, no full logits)",
    "lr_scheduler.last_epoch": "a fresh schedule starts at step 0",
    "beta2_scheduler.init_beta2": "beta2 is adam.adam_beta2",
    "beta2_scheduler.cur_iter": "a fresh schedule starts at step 0",
    "ckpt.async_upload": "object-store upload: evotune writes to a file system",
    "ckpt.async_upload_tmp_folder": "object-store upload: evotune writes to a file system",
    "ckpt.oss_snapshot_freq": "object-store snapshots: evotune writes atomic checkpoints",
    "ckpt.snapshot_ckpt_folder": "object-store snapshots: evotune writes atomic checkpoints",
    "ckpt.stop_file_path": "stop a run with Ctrl-C or by killing it; resume with --resume auto",
    "ckpt.load_optimizer": "evotune resumes its own checkpoints with --resume (optimizer included)",
    "ckpt.enable_save_ckpt": "evotune saves every save_steps and exports a Hugging Face model at the end",
    "model.use_flash_attn": "evotune picks the varlen kernel of the device",
    "model.parallel_output": "a tensor-parallel head detail",
    "model.embed_split_hidden": "a tensor-parallel embedding detail, read from the checkpoint",
    "model.num_chunks": "interleaved pipeline chunks: evotune has no pipeline",
    "model.norm_type": "read from the checkpoint",
    "model.mlp_ratio": "the FFN width is read from the checkpoint",
    "model.multiple_of": "the FFN width is read from the checkpoint",
    "model.no_bias": "read from the checkpoint",
    "model.qk_interleaved": "read from the checkpoint (InternEvo folders are converted when loaded)",
    "model.adapt_hf": "read from the checkpoint (InternEvo folders are converted when loaded)",
    "model.norm_head": "read from the checkpoint",
    "model.use_swiglu": "read from the checkpoint",
    "model.residual_in_fp32": "FSDP mixed precision keeps master weights in float32",
    "model.max_position_embeddings": "read from the checkpoint",
    "model.init_type": "weights come from the checkpoint",
    "model.layer_norm_epsilon": "read from the checkpoint",
    "model.rope_base": "read from the checkpoint",
    "parallel.pipeline.interleaved_overlap": "evotune has no pipeline",
    "parallel.weight.overlap": "FSDP2 prefetches the next layer by itself",
    "parallel.weight.memory_pool": "FSDP2 manages its buffers",
    "parallel.weight.launch_allgather_before": "FSDP2 prefetches the next layer by itself",
    "parallel.weight.forward_overlap_per": "FSDP2 prefetches the next layer by itself",
    "parallel.sequence_parallel": "follows parallel.tensor.mode",
}

# -- data of the multi-key decisions in translate.py -----------------------------------------------

# Model dimensions compared with the checkpoint: InternEvo key -> config.json key(s).
MODEL_DIMS = {
    "num_layers": ("num_layers", "num_hidden_layers"),
    "hidden_size": ("hidden_size",),
    "vocab_size": ("vocab_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_kv_attention_heads": ("num_kv_attention_heads", "num_key_value_heads"),
}

# What becomes of InternEvo's tensor parallel, by parallel.tensor.mode.
TENSOR_MODE_NOTES = {
    "mtp": "Megatron tensor parallel: its ranks share packs; evotune shards weights with FSDP instead",
    "msp": "Megatron tensor + sequence parallel -> Ulysses sequence parallel (all-to-all around "
           "attention); same packs per group, weights sharded by FSDP instead of split by tensor parallel",
    "fsp": "flash-attn tensor + sequence parallel -> Ulysses sequence parallel; same packs per group, "
           "weights sharded by FSDP",
    "isp": "InternEvo's isp is Ulysses-style: sequence shards, all-to-all around attention, as evotune's",
}
