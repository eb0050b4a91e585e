"""The one reader of a config: a validated config dict in, a frozen, typed :class:`Settings` out.

:func:`evotune.config.load_config` runs the file and checks top-level names and
``type=`` dicts; :func:`resolve` then turns the result into one dataclass per
component (model, data, optim, schedule, parallel, checkpoint, eval, logging,
runtime). Nothing else reads the config dict: training, validation, samples and
``evotune batches`` take these typed fields.

Where a value comes from, first found wins:

1. a command-line flag (``--seed``, ``--work-dir``, ``--deepspeed``'s
   ``gradient_clipping`` and bf16 setting, ``--resume``);
2. the field's *places* in the config, in order: the nested key XTuner reads
   (``optim_wrapper.accumulative_counts``, ``train_dataloader.batch_size``,
   ``train_cfg.max_epochs``, ``checkpoint.interval``, ``randomness.seed``, ...)
   before the top-level setting that feeds it (``accumulative_counts``);
3. the field's default.

A file that gives two places different values is one error naming both
(``accumulative_counts=2 ... but optim_wrapper.accumulative_counts=4``). A
dotted ``--cfg-options optim_wrapper.accumulative_counts=4`` sets the nested
place after the file ran: it wins over the top-level value the file fed it, no
conflict (a plain ``--cfg-options accumulative_counts=4`` rewrites the
assignment before the file runs, so both places get 4). A top-level value whose
nested place sits inside a ``type=`` dict that does not pass it on
(``min_length`` without ``dataset_cfg=dict(..., min_length=...)``) is written
into that dict, so it acts; a callable without that parameter refuses it.

Plain dicts (``optim_wrapper``, ``clip_grad``, ``train_dataloader``,
``train_cfg``, ``checkpoint``, ``randomness``) may hold only the keys the fields
below read; a typo is an error with the closest key, from the file or from
``--cfg-options``. Values are checked here too, each error one line naming the
key, the value and where it came from.

To add a setting: add a field to its section with :func:`setting` (default,
places, check); if it has a top-level name, add that name to
``evotune.config.SETTINGS``. The table printed at start
(:meth:`Settings.table`) and the plain-dict checks follow from the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Mapping

from evotune.config import check_type_keys, load_config, suggest
from evotune.dtypes import dtype_name, parse_dtype
from evotune.errors import EvotuneError
from evotune import xtuner_compat as xt

_MISSING = object()  # the config has no such place


# --------------------------------------------------------------------------- value checks
# Each takes (value, key) and returns the value to use; resolve() adds where the value came from.


def _fail(key: str, expected: str, value: Any) -> EvotuneError:
    return EvotuneError(f"{key}: expected {expected}, got {value!r}")


def positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(key, "a positive integer", value)
    return value


def nonnegative_int(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, "an integer >= 0", value)
    return value


def integer(value, key):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, "an integer", value)
    return value


def positive_number(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(key, "a number > 0", value)
    return value


def nonnegative_number(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise _fail(key, "a number >= 0", value)
    return value


def fraction(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _fail(key, "a number from 0 to 1", value)
    return value


def boolean(value, key):
    if not isinstance(value, bool):
        raise _fail(key, "True or False", value)
    return value


def string(value, key):
    if not isinstance(value, str) or not value:
        raise _fail(key, "a non-empty string", value)
    return value


def seed_or_zero(value, key):
    """An integer seed; None (XTuner's "pick one") is 0, so a run is repeatable by default."""
    return 0 if value is None else integer(value, key)


def text(value, key):
    if not isinstance(value, str):
        raise _fail(key, "a string", value)
    return value


def strings(value, key):
    """A list of non-empty strings; None or empty: none."""
    if not value:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(x, str) and x for x in value):
        raise _fail(key, "a list of non-empty strings", value)
    return tuple(value)


def spec(value, key):
    """A ``dict(type=..., ...)`` that a component builds with :func:`evotune.config.build`."""
    if not (isinstance(value, dict) and "type" in value):
        raise _fail(key, "dict(type=..., ...)", value)
    return value


def optional(check: Callable) -> Callable:
    """``check``, or None."""
    def check_optional(value, key):
        return None if value is None else check(value, key)
    return check_optional


optional_spec = optional(spec)  # one object, so plain_dicts() can tell where a type= dict sits


def one_of(*options) -> Callable:
    def check_one_of(value, key):
        if value not in options:
            raise _fail(key, "one of " + ", ".join(map(repr, options)), value)
        return value
    return check_one_of


def specs(value, key):
    """A list of ``type=`` dicts (``param_scheduler``)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise _fail(key, "a list of dict(type=..., ...)", value)
    return tuple(spec(v, f"{key}[{i}]") for i, v in enumerate(value))


def floating_dtype(value, key):
    """A dtype name (``'bfloat16'``, ``'bf16'``, ``torch.float32``), kept as its canonical name; None or 'auto': None."""
    parsed = parse_dtype(value, None, what=key)
    return None if parsed is None else dtype_name(parsed)


def anything(value, key):
    return value


# --------------------------------------------------------------------------- fields


def setting(default: Any, *places: str, check: Callable = anything, fill: bool = False, cli: str | None = None,
            doc: str = "") -> Any:
    """A settings field: ``default`` when none of ``places`` (dotted config paths, authoritative
    first) is set; ``check(value, key)`` validates and converts. ``fill``: a top-level value is
    written into the nested place (inside a ``type=`` dict) when that dict does not pass it on.
    ``cli``: the command-line flag that overrides every place."""
    return field(default=default, metadata={"places": places, "check": check, "fill": fill, "cli": cli,
                                            "doc": doc})


@dataclass(frozen=True)
class ModelSettings:
    spec: dict | None = setting(None, "model", check=optional_spec, doc="the trained module (SupervisedFinetune)")
    tokenizer: dict | None = setting(None, "tokenizer", "custom_hooks.EvaluateChatHook.tokenizer",
                                     "custom_hooks.DatasetInfoHook.tokenizer", check=optional_spec)
    path: str | None = setting(None, "model.llm.path", "model.llm.pretrained_model_name_or_path",
                               "pretrained_model_name_or_path", check=optional(string),
                               doc="the model loaded (for messages)")
    use_varlen_attn: bool = setting(True, "model.use_varlen_attn", "train_dataloader.collate_fn.use_varlen_attn",
                                    "use_varlen_attn", check=boolean, fill=True)
    label_smoothing: float = setting(0.0, "model.label_smoothing", "label_smoothing", check=nonnegative_number,
                                     fill=True)


@dataclass(frozen=True)
class DataSettings:
    dataset: dict | None = setting(None, "train_dataset", check=optional_spec)
    folder: str | None = setting(None, "train_dataset.dataset_cfg.folder", "dataset_folder", check=optional(string),
                                 fill=True)
    data_order_path: str | None = setting(None, "train_dataset.dataset_cfg.data_order_path", "data_order_path",
                                          check=optional(string), fill=True)
    min_length: int = setting(0, "train_dataset.dataset_cfg.min_length", "min_length", check=nonnegative_int,
                              fill=True, doc="documents shorter than this are dropped (training and validation)")
    max_length: int | None = setting(None, "train_dataset.packed_length", "train_dataset.max_length", "max_length",
                                     check=optional(positive_int), fill=True, doc="tokens per pack")
    max_length_per_sample: int | None = setting(None, "train_dataset.max_length_per_sample", "max_length_per_sample",
                                                check=optional(positive_int), fill=True)
    pack_sample_into_one: bool = setting(False, "train_dataset.pack_sample_into_one", "pack_sample_into_one",
                                         check=boolean, fill=True)
    dataset_weights: dict | None = setting(None, "train_dataset.dataset_weights", "dataset_weights", fill=True)
    seed: int | None = setting(None, "train_dataset.seed", "seed", check=optional(integer), fill=True,
                               doc="data seed: the pack order (None: build_packed_dataset's 1024)")
    batch_size: int = setting(1, "train_dataloader.batch_sampler.batch_size", "train_dataloader.batch_size",
                              "batch_size", check=positive_int, doc="packs per micro-batch per device")
    batch_sampler: Any = setting(None, "train_dataloader.batch_sampler", check=xt.is_a(xt.BatchSampler))
    collate_fn: Any = setting(None, "train_dataloader.collate_fn", check=xt.is_a(xt.default_collate_fn))
    pack_to_max_length: bool = setting(True, "train_dataset.pack_to_max_length", "pack_to_max_length",
                                       check=boolean, doc="InternEvo folders are always packed")
    dataset_info: Any = setting(None, "custom_hooks.DatasetInfoHook", check=xt.is_a(xt.DatasetInfoHook),
                                doc="print the first pack decoded, with its loss mask, at start")
    num_workers: int = setting(0, "train_dataloader.num_workers", check=nonnegative_int,
                               doc="worker processes reading and collating packs (0: one thread)")
    sampler: dict | None = setting(None, "train_dataloader.sampler", check=optional_spec,
                                   doc="None: SequenceParallelSampler")


@dataclass(frozen=True)
class OptimSettings:
    wrapper: Any = setting(None, "optim_wrapper.type", check=xt.is_a(xt.AmpOptimWrapper, xt.OptimWrapper))
    optimizer: dict | None = setting(None, "optim_wrapper.optimizer", check=optional_spec)
    lr: float | None = setting(None, "optim_wrapper.optimizer.lr", "lr", check=optional(nonnegative_number), fill=True)
    betas: tuple | None = setting(None, "optim_wrapper.optimizer.betas", "betas", fill=True)
    eps: float | None = setting(None, "optim_wrapper.optimizer.eps", "eps", check=optional(nonnegative_number),
                                fill=True)
    weight_decay: float | None = setting(None, "optim_wrapper.optimizer.weight_decay", "weight_decay",
                                         check=optional(nonnegative_number), fill=True)
    accumulative_counts: int = setting(1, "optim_wrapper.accumulative_counts", "accumulative_counts",
                                       check=positive_int, doc="micro-batches per optimizer step")
    max_norm: float | None = setting(None, "optim_wrapper.clip_grad.max_norm", "max_norm",
                                     check=optional(nonnegative_number), cli="--deepspeed",
                                     doc="gradient clipping (None or 0: none)")
    error_if_nonfinite: bool = setting(False, "optim_wrapper.clip_grad.error_if_nonfinite", check=xt.only(
        (False,), "a step with a NaN/inf gradient norm is skipped and counted (max_consecutive_skips stops the "
                  "run); remove error_if_nonfinite"))
    dtype: str | None = setting(None, "optim_wrapper.dtype", check=floating_dtype, cli="--deepspeed",
                                doc="compute dtype on CUDA (None: bfloat16); the CPU computes in float32 "
                                    "unless float16 is asked for")
    loss_scale: dict = setting("dynamic", "optim_wrapper.loss_scale", check=xt.loss_scale,
                               doc="float16 loss scaling (evotune/train/loss_scale.py); unused otherwise")
    loss_reduction: str = setting("pack", "loss_reduction", check=one_of("pack", "token"))
    max_consecutive_skips: int = setting(5, "max_consecutive_skips", check=positive_int,
                                         doc="stop after this many steps in a row with a NaN/inf loss or grad "
                                             "norm (each is skipped)")
    max_skipped_fraction: float = setting(0.05, "max_skipped_fraction", check=fraction,
                                          doc="stop when skipped steps exceed this share of the run's steps")


@dataclass(frozen=True)
class ScheduleSettings:
    phases: tuple = setting((), "param_scheduler", check=specs)
    max_epochs: float = setting(1, "train_cfg.max_epochs", "max_epochs", check=positive_number)
    max_steps: int | None = setting(None, "train_cfg.max_iters", "train_cfg.max_steps", "max_steps",
                                    check=optional(positive_int), doc="optimizer steps (None: max_epochs)")
    loop: Any = setting(None, "train_cfg.type", check=xt.is_a(xt.TrainLoop))


@dataclass(frozen=True)
class ParallelSettings:
    sequence_parallel_size: int = setting(1, "sequence_parallel_size", check=positive_int)
    activation_checkpointing: Any = setting("auto", "model.activation_checkpointing", "activation_checkpointing",
                                            fill=True, doc="'auto' (sized from free GPU memory; 'full' on the "
                                                           "CPU), 'full', 'selective', 'none'")
    torch_compile: Any = setting("auto", "model.torch_compile", "torch_compile", fill=True,
                                 doc="'auto' (compile the decoder layers on a GPU with bf16 compute), True, "
                                     "False or a dict of torch.compile options")
    deepspeed: Any = setting(None, cli="--deepspeed", doc="the ZeRO preset (evotune.parallel.zero.ZeroSettings)")


@dataclass(frozen=True)
class CheckpointSettings:
    interval: int = setting(0, "default_hooks.checkpoint.interval", "checkpoint.interval", "save_steps",
                            check=nonnegative_int, doc="save every N steps (0: only at the end)")
    keep: int = setting(-1, "default_hooks.checkpoint.max_keep_ckpts", "checkpoint.max_keep_ckpts",
                        "save_total_limit", check=optional(integer),
                        doc="keep the newest N checkpoints (< 1 or None: all)")
    save_format: str | None = setting(None, "save_format", check=optional(one_of("huggingface", "internlm2")),
                                      doc="layout of hf/ (None: the layout the model came in)")
    save_merged: bool = setting(False, "save_merged", check=boolean,
                                doc="LoRA: also write hf/, the base + adapter merged (as evotune convert merge)")


@dataclass(frozen=True)
class EvalSettings:
    valid_folder: str | None = setting(None, "valid_folder", check=optional(string))
    freq: int | None = setting(None, "custom_hooks.EvaluateChatHook.every_n_iters", "evaluation_freq",
                               check=optional(positive_int),
                               doc="validation and samples every N steps (None: only at the end)")
    inputs: tuple = setting((), "custom_hooks.EvaluateChatHook.evaluation_inputs", "evaluation_inputs",
                            check=strings)
    max_new_tokens: int = setting(600, "custom_hooks.EvaluateChatHook.max_new_tokens", "max_new_tokens",
                                  check=positive_int)  # XTuner's EvaluateChatHook default
    system: str | None = setting(None, "custom_hooks.EvaluateChatHook.system", "SYSTEM", check=optional(text))
    prompt_template: str | None = setting(None, "custom_hooks.EvaluateChatHook.prompt_template", "prompt_template")


@dataclass(frozen=True)
class LoggingSettings:
    interval: int = setting(1, "default_hooks.logger.interval", "log_interval", check=positive_int)
    visualizer: Any = setting(None, "visualizer")
    log_level: str = setting("INFO", "log_level", check=xt.only(("INFO",), "evotune prints progress at INFO"))
    log_processor: dict | None = setting(None, "log_processor", check=xt.log_processor)


@dataclass(frozen=True)
class RuntimeSettings:
    seed: int = setting(0, "randomness.seed", check=seed_or_zero, cli="--seed",
                        doc="RNG seed of python, numpy and torch (the data seed is data.seed)")
    work_dir: str | None = setting(None, "work_dir", check=optional(string), cli="--work-dir",
                                   doc="None: ./work_dirs/<config name>")
    resume: str | None = setting(None, "resume", check=xt.resume_flag, cli="--resume",
                                 doc="auto: the work dir's latest checkpoint; or a checkpoint path")
    resume_data_changed: bool = setting(False, cli="--resume-data-changed",
                                        doc="resume although the training data changed since the checkpoint")
    load_from: str | None = setting(None, "load_from", check=optional(string),
                                    doc="initial weights: an evotune checkpoint (checkpoints/step_N)")
    deterministic: bool = setting(False, "randomness.deterministic", check=boolean,
                                  doc="torch.use_deterministic_algorithms")
    diff_rank_seed: bool = setting(False, "randomness.diff_rank_seed", check=xt.only(
        (False,), "every rank uses the same seed; the data order is the sampler's"))
    cudnn_benchmark: bool = setting(False, "env_cfg.cudnn_benchmark", check=boolean)
    mp_start_method: str = setting("fork", "env_cfg.mp_cfg.mp_start_method", check=xt.only(
        ("fork",), "data workers are forked (evotune/data/loader.py)"))
    opencv_num_threads: int = setting(0, "env_cfg.mp_cfg.opencv_num_threads", check=nonnegative_int,
                                      doc="accepted: evotune uses no OpenCV")
    dist_backend: str = setting("nccl", "env_cfg.dist_cfg.backend", check=xt.only(
        ("nccl",), "evotune uses nccl on CUDA and gloo on the CPU"), doc="nccl on CUDA, gloo on the CPU")
    config_path: str | None = setting(None, doc="the config file")


SECTIONS = {
    "model": ModelSettings, "data": DataSettings, "optim": OptimSettings, "schedule": ScheduleSettings,
    "parallel": ParallelSettings, "checkpoint": CheckpointSettings, "eval": EvalSettings,
    "logging": LoggingSettings, "runtime": RuntimeSettings,
}


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    data: DataSettings
    optim: OptimSettings
    schedule: ScheduleSettings
    parallel: ParallelSettings
    checkpoint: CheckpointSettings
    eval: EvalSettings
    logging: LoggingSettings
    runtime: RuntimeSettings
    sources: Mapping[str, str]  # "optim.accumulative_counts" -> "--cfg-options optim_wrapper.accumulative_counts"

    def table(self) -> list[tuple[str, str, str]]:
        """``(name, value, source)`` of every field, for the start-up table."""
        rows = []
        for name in SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                key = f"{name}.{f.name}"
                rows.append((key, _show(getattr(section, f.name)), self.sources[key]))
        return rows

    def format_table(self) -> str:
        """The effective settings as aligned lines: name, value, where it came from."""
        rows = self.table()
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"  {n:<{width[0]}}  {v:<{width[1]}}  {s}" for n, v, s in rows)


def _show(value: Any) -> str:
    if isinstance(value, dict) and "type" in value:
        t = value["type"]
        return f"{getattr(t, '__name__', t)}(...)"
    if isinstance(value, tuple) and value and all(isinstance(v, dict) and "type" in v for v in value):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, type):  # an XTuner marker (evotune/xtuner_compat.py)
        return value.__name__
    if dataclasses.is_dataclass(value):
        return getattr(value, "source", type(value).__name__)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- resolve


def _get(cfg: dict, place: str) -> Any:
    node: Any = cfg
    for part in place.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _all_fields():
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield section, f


def plain_dicts() -> dict[str, set[str]]:
    """``{dotted path of a plain dict: the keys it may hold}``, from the fields' places.

    A dict inside a ``type=`` dict (``train_dataset.dataset_cfg``) is checked
    against its callable's parameters instead (:func:`evotune.config.validate`).
    An XTuner marker's dict (``default_hooks.checkpoint``) may also hold the
    parameters whose values the marker fixes (:func:`evotune.xtuner_compat.check_fixed`).
    """
    specs_at = {f.metadata["places"][0] for _, f in _all_fields()
                if f.metadata["places"] and (f.metadata["check"] in (spec, optional_spec, specs)
                                             or getattr(f.metadata["check"], "reads_type_dict", False))}
    found: dict[str, set[str]] = {}
    for _, f in _all_fields():
        for place in f.metadata["places"]:
            parts = place.split(".")
            for i in range(1, len(parts)):
                container = ".".join(parts[:i])
                if any(container == s or container.startswith(s + ".") for s in specs_at):
                    break
                found.setdefault(container, set()).add(parts[i])
    return found


class _Sources:
    """Where each place's value came from: the file, or ``--cfg-options``."""

    def __init__(self, cfg: dict):
        path = cfg.get("_config_path")
        self.file = os.path.basename(path) if path else "config"
        self.options: dict[str, Any] = cfg.get("_cfg_options") or {}
        self.dotted = [k for k in self.options if "." in k]

    def dotted_override(self, place: str) -> str | None:
        """The dotted ``--cfg-options`` key that set ``place`` (or a dict above it) after the file ran."""
        return next((k for k in self.dotted if place == k or place.startswith(k + ".")
                     or k.startswith(place + ".")), None)

    def of(self, place: str, top_level: tuple[str, ...] = ()) -> str:
        override = self.dotted_override(place)
        if override:
            return f"--cfg-options {override}"
        for name in (place, *top_level):
            if name in self.options:
                return f"--cfg-options {name}"
        return f"{self.file}: {place}"


def _fill(cfg: dict, sources: _Sources) -> dict:
    """A copy of ``cfg`` where a top-level value reaches the nested place a ``type=`` dict did not set."""
    cfg = dict(cfg)
    for _, f in _all_fields():
        places = f.metadata["places"]
        if not f.metadata["fill"] or len(places) < 2:
            continue
        nested, top = places[0], places[-1]
        parent_path, _, key = nested.rpartition(".")
        if top not in cfg or any(_get(cfg, p) is not _MISSING for p in places[:-1]) or nested.split(".")[0] not in cfg:
            continue
        if not isinstance(_get(cfg, parent_path), dict):
            raise EvotuneError(f"{top} cannot act ({sources.of(top)}): {parent_path} is not a dict that could pass "
                               f"it on as {key}; remove {top} or set what {nested.split('.')[0]} reads")
        node = cfg
        for part in parent_path.split("."):
            node[part] = dict(node[part])
            node = node[part]
        node[key] = cfg[top]
        if "type" in node:
            check_type_keys(node, f"{sources.of(top)} (passed on to {parent_path})")
    return cfg


def _check_plain_dicts(cfg: dict, sources: _Sources) -> None:
    for path, keys in sorted(plain_dicts().items()):
        node = _get(cfg, path)
        if node is _MISSING or node is None:
            continue
        if not isinstance(node, dict):
            raise EvotuneError(f"{path}: expected a dict with keys {', '.join(sorted(keys))}, got {node!r} "
                               f"({sources.of(path)})")
        keys = keys | set(getattr(node.get("type"), "fixed", ()))
        for key in node:
            if key not in keys and not (key == "type" and hasattr(node["type"], "fixed")):
                raise EvotuneError(f"{sources.of(f'{path}.{key}')}: '{key}' is not a key of {path}"
                                   f"{suggest(key, keys)} (it may hold {', '.join(sorted(keys))})")


def resolve(cfg: dict, *, seed: int | None = None, work_dir: str | None = None, resume: str | None = None,
            deepspeed=None, resume_data_changed: bool | None = None) -> Settings:
    """The settings of a validated config (:func:`evotune.config.load_config`) and the command line.

    ``deepspeed``: the ``--deepspeed`` preset (``evotune.parallel.zero.ZeroSettings``),
    whose ``gradient_clipping`` and bf16 setting win over the config's.
    """
    sources = _Sources(cfg)
    for key, value in cfg.items():
        if not key.startswith("_"):
            xt.check_fixed(value, key, sources.of(key))
    cfg = xt.normalise(cfg, sources)
    _check_plain_dicts(cfg, sources)
    filled = _fill(cfg, sources)
    cli: dict[str, tuple[Any, str]] = {"runtime.config_path": (cfg.get("_config_path"), "CONFIG argument")}
    for key, value, flag in (("runtime.seed", seed, "--seed"), ("runtime.work_dir", work_dir, "--work-dir"),
                             ("runtime.resume", resume, "--resume"),
                             ("runtime.resume_data_changed", resume_data_changed, "--resume-data-changed")):
        if value is not None:
            cli[key] = (value, flag)
    if deepspeed is not None:
        flag = f"--deepspeed {deepspeed.source}"
        cli["parallel.deepspeed"] = (deepspeed, flag)
        if deepspeed.gradient_clipping is not None:
            cli["optim.max_norm"] = (deepspeed.gradient_clipping, flag)
        if deepspeed.compute_dtype is not None:
            cli["optim.dtype"] = (dtype_name(deepspeed.compute_dtype), flag)
    if work_dir is None and "work_dir" not in cfg:
        name = os.path.splitext(os.path.basename(cfg.get("_config_path") or "config"))[0]
        cli["runtime.work_dir"] = (os.path.join("work_dirs", name), "default")

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    where_from: dict[str, str] = {}
    for section, f in _all_fields():
        key = f"{section}.{f.name}"
        if key in cli:
            value, source = cli[key]
            name = source
        else:
            value, source, name = _from_places(filled, cfg, f.metadata["places"], sources, f.default)
        try:
            values[section][f.name] = f.metadata["check"](value, name)
        except EvotuneError as e:
            raise EvotuneError(f"{e} ({source})" if source != name else str(e)) from None
        if name in xt.ITERATION_PLACES and values[section][f.name]:  # XTuner counts micro-batches
            accum = values["optim"]["accumulative_counts"]
            values[section][f.name] = xt.iterations_to_steps(values[section][f.name], accum)
            if accum > 1:
                source += f" ({value} iterations of {accum} micro-batches per step)"
        where_from[key] = source
    _check_xtuner_combinations(values, cfg, sources, where_from)
    if values["checkpoint"]["save_merged"] and not (values["model"]["spec"] or {}).get("lora"):
        raise EvotuneError(f"save_merged=True ({where_from['checkpoint.save_merged']}) merges a LoRA adapter into "
                           "its base, but the model has no lora=: a full fine-tune writes hf/ anyway; remove "
                           "save_merged or add lora=dict(type=LoraConfig, ...) to the model")
    return Settings(**{name: SECTIONS[name](**values[name]) for name in SECTIONS},
                    sources=MappingProxyType(where_from))


def _check_xtuner_combinations(values: dict, cfg: dict, sources: _Sources, where_from: dict) -> None:
    """Settings that act only together: ``resume=True`` + ``load_from`` (mmengine: resume from that
    checkpoint), ``pack_to_max_length``, epoch-based schedule phases."""
    runtime = values["runtime"]
    if runtime["load_from"] and cfg.get("resume") is True and where_from["runtime.resume"] != "--resume":
        runtime["resume"], runtime["load_from"] = runtime["load_from"], None
        where_from["runtime.resume"] = f"{sources.of('resume')} with {sources.of('load_from')}"
        where_from["runtime.load_from"] = "resumed from instead"
    dataset = values["data"]["dataset"]
    if not values["data"]["pack_to_max_length"] and not (dataset and "pack_to_max_length" in dataset):
        raise EvotuneError(f"pack_to_max_length=False ({sources.of('pack_to_max_length')}): "
                           f"{xt.type_name((dataset or {}).get('type'))} always packs to max_length; "
                           "set pack_to_max_length=True")
    for i, phase in enumerate(values["schedule"]["phases"]):
        if phase.get("by_epoch", True) and phase.get("convert_to_iter_based") is False:
            raise EvotuneError(f"param_scheduler[{i}]: by_epoch=True with convert_to_iter_based=False "
                               f"({sources.of('param_scheduler')}) changes the lr once per epoch; evotune "
                               "changes it every step: set convert_to_iter_based=True")


def _from_places(filled: dict, original: dict, places: tuple[str, ...], sources: _Sources, default):
    """(value, source, key) of the first place set; two places of the file that disagree are an error.

    The value is read from ``filled`` (``type=`` dicts with top-level values passed on)."""
    found = [(p, _get(original, p)) for p in places if _get(original, p) is not _MISSING]
    if not found:
        return default, "default", places[0] if places else "value"
    place, value = found[0]
    if not sources.dotted_override(place):
        for other, other_value in found[1:]:
            if other_value != value:
                raise EvotuneError(
                    f"{other}={other_value!r} ({sources.of(other)}) but {place}={value!r} ({sources.of(place)}): "
                    f"{place} is the one read; give both the same value, or pass {other} on "
                    f"({place.rpartition('.')[2]}={other})")
    return _get(filled, place), sources.of(place, tuple(p for p in places if "." not in p)), place


def load_settings(path: str, cfg_options: list[str] | None = None, **cli) -> Settings:
    """:func:`evotune.config.load_config` then :func:`resolve` (``cli``: its keyword arguments)."""
    return resolve(load_config(path, cfg_options), **cli)
