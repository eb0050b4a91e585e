"""XTuner 0.2 configs run unchanged: what their imports resolve to, and how their structure is read.

An XTuner config imports ``mmengine.hooks``, ``mmengine.optim``,
``xtuner.dataset...``, ``xtuner.engine...``, ``transformers.AutoModelForCausalLM``
and so on. :func:`config_builtins` gives the namespace a config file runs in
(evotune/config.py) its own ``__import__``: for those modules it returns
stand-in module objects whose names are evotune's equivalents; every other
import is Python's own. Nothing is put into ``sys.modules`` and nothing stays
installed after the file ran, so mmengine and xtuner are never needed and a real
installation of either is never shadowed (tests/test_xtuner_configs.py).

What a name becomes:

* a working evotune object when evotune has the same thing (``SupervisedFinetune``,
  ``build_packed_dataset``, ``InternRepoSampler``, ``CosineAnnealingLR``,
  XTuner's map functions and templates);
* ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``:
  evotune's loaders (:func:`evotune.model.load.load_model`, ``load_tokenizer``);
  remote code never runs, ``trust_remote_code=True`` is accepted and said once;
* ``BitsAndBytesConfig``: transformers' own, with its named parameters only (an
  unknown key is refused, not logged and ignored), the LLM.int8() keys fixed;
* a :class:`Marker` for the names that describe the run rather than build an
  object (hooks, ``AmpOptimWrapper``, ``TrainLoop``, ``BatchSampler``,
  ``default_collate_fn``, the visualizer): a ``dict(type=<marker>, ...)`` is read
  by :func:`evotune.settings.resolve` (its keys are checked against the
  marker's parameters like any ``type=`` dict, and values evotune cannot honour
  are refused with the reason, :data:`Marker.fixed`);
* a name XTuner has and evotune does not: the import fails with one line naming
  it and what to use instead (:data:`MISSING`).

:func:`normalise` turns XTuner's structure into the places the settings read
(``custom_hooks`` list -> ``custom_hooks.<HookName>``, ``train_dataloader.dataset``
-> ``train_dataset``, an mmengine visualizer -> ``'tensorboard'``).
docs/migrating-from-xtuner.md lists what runs, what differs and why.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import math
import types
from collections.abc import Callable
from typing import Any

import evotune
from evotune.errors import EvotuneError

# --------------------------------------------------------------------------- markers


class Marker:
    """An XTuner/mmengine name that the settings read instead of building.

    Each subclass carries a signature (``__signature__``: the parameters a
    ``type=`` dict may hold, checked by evotune/config.py). ``fixed``: ``{parameter: (values evotune honours,
    why another value is refused)}``; the default of a parameter not written is
    its signature default, as in mmengine.
    """

    fixed: dict[str, tuple[tuple, str]] = {}

    def __init__(self, *args, **kwargs):
        raise EvotuneError(f"{type(self).__name__} is an XTuner/mmengine name that evotune's settings read "
                           f"(dict(type={type(self).__name__}, ...) in the config); it is not built")


R = inspect.Parameter.empty  # a parameter without a default


def _marker(name: str, does: str, params: dict[str, Any], fixed: dict | None = None) -> type[Marker]:
    """A :class:`Marker` subclass with the signature ``params`` (name -> default, ``R`` for none);
    ``does`` (its docstring) says what evotune does for it."""
    signature = inspect.Signature([inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                                   for k, v in params.items()])
    return type(name, (Marker,), {"__signature__": signature, "fixed": fixed or {}, "__module__": __name__,
                                  "__doc__": does})


_GREEDY = "evotune answers greedily with the template's stop words and EOS"
# mmengine.hooks
CheckpointHook = _marker(
    "CheckpointHook", "checkpoint.interval / checkpoint.keep (DCP checkpoints, every `interval` iterations)",
    dict(interval=-1, by_epoch=True, max_keep_ckpts=-1, save_last=True, save_optimizer=True,
         save_param_scheduler=True, out_dir=None, save_begin=0),
    {"by_epoch": ((False,), "evotune saves every `interval` iterations; set by_epoch=False"),
     "save_last": ((True,), "evotune always saves the last step"),
     "save_optimizer": ((True,), "an evotune checkpoint always holds the optimizer (exact resume)"),
     "save_param_scheduler": ((True,), "an evotune checkpoint always holds the schedule (exact resume)"),
     "out_dir": ((None,), "checkpoints go to <work_dir>/checkpoints; set --work-dir"),
     "save_begin": ((0,), "evotune saves from the first interval on")})
# XTuner's TrainLoop counts iterations, never epochs, so log_metric_by_epoch changes nothing there either
LoggerHook = _marker(
    "LoggerHook", "logging.interval (progress line every `interval` iterations; metrics.jsonl has every step)",
    dict(interval=10, log_metric_by_epoch=True),
    {"log_metric_by_epoch": ((True, False), "")})
IterTimerHook = _marker("IterTimerHook", "accepted: every step logs step_time and data_time", {})
ParamSchedulerHook = _marker("ParamSchedulerHook", "accepted: the schedule steps with every optimizer step", {})
DistSamplerSeedHook = _marker("DistSamplerSeedHook", "accepted: the sampler orders each epoch by its seed and "
                                                     "the epoch number", {})
# xtuner.engine.hooks
EvaluateChatHook = _marker(
    "EvaluateChatHook", "eval.inputs / eval.freq / eval.system / eval.prompt_template / eval.max_new_tokens: "
                        "sample answers in eval_samples.jsonl",
    dict(tokenizer=R, evaluation_inputs=R, evaluation_images=None, image_processor=None, system="",
         prompt_template=None, every_n_iters=None, max_new_tokens=600, stop_word=None, stop_words=(),
         generation_kwargs=None),
    {"evaluation_images": ((None,), "evotune trains language models only"),
     "image_processor": ((None,), "evotune trains language models only"),
     "stop_word": ((None,), _GREEDY + "; remove stop_word"),
     "stop_words": (((), []), _GREEDY + "; remove stop_words"),
     "generation_kwargs": ((None, {}), _GREEDY + "; remove generation_kwargs")})
# is_intern_repo_dataset: XTuner decodes InternEvo's negative ids (input, no target) only when told; evotune always
DatasetInfoHook = _marker("DatasetInfoHook", "data.dataset_info: the first pack is printed decoded, with its loss "
                                             "mask, at start", dict(tokenizer=R, is_intern_repo_dataset=False),
                          {"is_intern_repo_dataset": ((True, False), "")})
ThroughputHook = _marker(
    "ThroughputHook", "accepted: every step logs tgs (tokens per GPU per second), step_time and mfu on GPUs",
    dict.fromkeys(("use_activation_checkpointing", "hidden_size", "num_layers", "vocab_size", "mlp_ratio",
                   "is_casual")),
    {name: ((None,), "evotune computes mfu from the model itself; remove it")
     for name in ("use_activation_checkpointing", "hidden_size", "num_layers", "vocab_size", "mlp_ratio",
                  "is_casual")})
VarlenAttnArgsToMessageHubHook = _marker(
    "VarlenAttnArgsToMessageHubHook", "accepted: varlen attention receives the document bounds as forward "
                                      "arguments (use_varlen_attn)", {})
HFCheckpointHook = _marker("HFCheckpointHook", "accepted: <work_dir>/hf is always written at the end",
                           dict(out_dir=None), {"out_dir": ((None,), "the model is exported to <work_dir>/hf")})
# mmengine.optim, xtuner.engine.runner, torch.utils.data, xtuner.dataset.collate_fns, mmengine.visualization
AmpOptimWrapper = _marker(
    "AmpOptimWrapper", "optim.*: accumulation, clipping, compute dtype and loss scaling",
    dict(optimizer=R, accumulative_counts=1, clip_grad=None, loss_scale="dynamic", dtype=None))
OptimWrapper = _marker("OptimWrapper", "optim.*: accumulation and clipping (compute in the default dtype)",
                       dict(optimizer=R, accumulative_counts=1, clip_grad=None))
TrainLoop = _marker("TrainLoop", "schedule.max_epochs / schedule.max_steps", dict(max_iters=None, max_epochs=None))
BatchSampler = _marker(
    "BatchSampler", "data.batch_size (packs per micro-batch)", dict(sampler=None, batch_size=1, drop_last=True),
    {"drop_last": ((True,), "evotune always drops the last incomplete step of an epoch"),
     "sampler": ((None,), "the sampler is train_dataloader.sampler")})
default_collate_fn = _marker(
    "default_collate_fn", "accepted: packs are collated into one varlen row (evotune/data/collate.py)",
    dict(pad_index=0, return_hf_format=False, use_varlen_attn=False),
    {"pad_index": ((0,), "a packed row has no padding"),
     "return_hf_format": ((False,), "evotune's loop takes its own batch format")})
Visualizer = _marker("Visualizer", "logging.visualizer: TensorboardVisBackend -> 'tensorboard'; metrics.jsonl is "
                                   "always written", dict(vis_backends=None, save_dir=None),
                     {"save_dir": ((None,), "TensorBoard files go to <work_dir>/tensorboard")})
LocalVisBackend = _marker("LocalVisBackend", "accepted: metrics.jsonl is always written", dict(save_dir=None),
                          {"save_dir": ((None,), "metrics.jsonl is written to the work dir")})
TensorboardVisBackend = _marker("TensorboardVisBackend", "visualizer = 'tensorboard'", dict(save_dir=None),
                                {"save_dir": ((None,), "TensorBoard files go to <work_dir>/tensorboard")})


def DefaultSampler(dataset, shuffle: bool = True, seed: int | None = None, round_up: bool = True, *,
                   dp_size: int = 1, dp_rank: int = 0, micro_num: int = 1):
    """mmengine's ``DefaultSampler``: evotune's sampler (InternEvo's order, evotune/data/sampler.py).

    ``round_up`` is accepted either way: evotune never repeats packs to fill the
    last step of an epoch, it drops that incomplete step (docs/migrating-from-xtuner.md).
    """
    return evotune.InternRepoSampler(dataset, shuffle=shuffle, seed=seed, dp_size=dp_size, dp_rank=dp_rank,
                                     micro_num=micro_num)


# --------------------------------------------------------------------------- the Hugging Face loaders

_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"evotune: {message}")


def _no_remote_code(path, trust_remote_code: bool) -> None:
    if trust_remote_code:
        _say_once(f"trust_remote_code=True: evotune loads {path} with its own code and never runs remote code")


class AutoModelForCausalLM:
    """``transformers.AutoModelForCausalLM`` in a config: ``from_pretrained`` is evotune's loader."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, trust_remote_code: bool = False, torch_dtype=None,
                        dtype=None, attn_implementation=None, quantization_config=None):
        """:func:`evotune.model.load.load_model` (HF, InternLM2 or InternEvo folder, or a hub id).

        ``attn_implementation``: evotune's attention (varlen, flash-attn when
        installed) replaces the model's, so only None or ``'flash_attention_2'``
        (XTuner's requirement for varlen attention) are accepted.
        """
        _no_remote_code(pretrained_model_name_or_path, trust_remote_code)
        kwargs = {"dtype": dtype if dtype is not None else torch_dtype}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return evotune.load_model(pretrained_model_name_or_path, **kwargs)


AutoModelForCausalLM.from_pretrained.fixed = {
    "attn_implementation": ((None, "flash_attention_2"), "evotune's varlen attention replaces the model's "
                                                         "(flash-attn when installed); remove attn_implementation")}


class AutoTokenizer:
    """``transformers.AutoTokenizer`` in a config: ``from_pretrained`` is evotune's ``load_tokenizer``."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, trust_remote_code: bool = False, padding_side=None):
        """:func:`evotune.model.load.load_tokenizer`; ``padding_side`` is set on it (prompts are padded
        on the left for generation whatever it says)."""
        _no_remote_code(pretrained_model_name_or_path, trust_remote_code)
        tokenizer = evotune.load_tokenizer(pretrained_model_name_or_path)
        if tokenizer is not None and padding_side is not None:
            tokenizer.padding_side = padding_side
        return tokenizer


def BitsAndBytesConfig(*, load_in_8bit: bool = False, load_in_4bit: bool = False, llm_int8_threshold: float = 6.0,
                       llm_int8_skip_modules=None, llm_int8_enable_fp32_cpu_offload: bool = False,
                       llm_int8_has_fp16_weight: bool = False, bnb_4bit_compute_dtype=None,
                       bnb_4bit_quant_type: str = "fp4", bnb_4bit_use_double_quant: bool = False,
                       bnb_4bit_quant_storage=None):
    """``transformers.BitsAndBytesConfig`` in a config, with its named parameters only.

    The real class takes ``**kwargs`` and only logs the ones it does not know, so
    a misspelt ``bnb_4bit_quant_type`` would quietly train FP4; here an unknown
    key is refused at load like any ``type=`` dict's (evotune/config.py). What
    each key does: evotune/model/lora.py ``quantize`` (docs/lora.md); the two
    LLM.int8() keys are :data:`fixed` at their defaults.
    """
    kwargs = dict(locals())  # the named parameters, nothing else
    from transformers import BitsAndBytesConfig as real

    return real(**kwargs)


_INT8_ONLY = "an LLM.int8() (8-bit) setting, which does nothing to the 4-bit layers evotune trains; remove it"
BitsAndBytesConfig.fixed = {"llm_int8_threshold": ((6.0, 6), _INT8_ONLY),
                            "llm_int8_has_fp16_weight": ((False,), _INT8_ONLY)}


def tokenizer_path(spec: dict | None) -> str | None:
    """The folder or hub id a ``tokenizer`` dict names: evotune's ``path=`` or XTuner's
    ``pretrained_model_name_or_path=``."""
    spec = spec or {}
    return spec.get("path") or spec.get("pretrained_model_name_or_path")


# --------------------------------------------------------------------------- the import table

_HOOKS = ("CheckpointHook", "LoggerHook", "IterTimerHook", "ParamSchedulerHook", "DistSamplerSeedHook")
_XTUNER_HOOKS = ("EvaluateChatHook", "DatasetInfoHook", "ThroughputHook", "VarlenAttnArgsToMessageHubHook",
                 "HFCheckpointHook")
_MAP_FNS = ("alpaca_map_fn", "alpaca_zh_map_fn", "arxiv_map_fn", "code_alpaca_map_fn", "colors_map_fn",
            "crime_kg_assitant_map_fn", "default_map_fn", "law_reference_map_fn", "medical_map_fn",
            "oasst1_map_fn", "openai_map_fn", "openorca_map_fn", "pretrain_map_fn", "sql_map_fn",
            "stack_exchange_map_fn", "tiny_codes_map_fn", "wizardlm_map_fn", "template_map_fn",
            "template_map_fn_factory", "DATASET_FORMAT_MAPPING")
_INTERN_REPO = ("build_packed_dataset", "load_intern_repo_tokenized_dataset", "load_intern_repo_untokenized_dataset")
_SP = "evotune splits sequences itself: set sequence_parallel_size (docs/sequence-parallel.md)"

# module -> {name: where it comes from}: "evotune:NAME" (an evotune export), "here:NAME" (this module)
MODULES: dict[str, dict[str, str]] = {
    "mmengine": {},
    "mmengine.hooks": {n: f"here:{n}" for n in _HOOKS},
    "mmengine.optim": {"AmpOptimWrapper": "here:AmpOptimWrapper", "OptimWrapper": "here:OptimWrapper",
                       "CosineAnnealingLR": "evotune:CosineAnnealingLR", "LinearLR": "evotune:LinearLR"},
    "mmengine.dataset": {"DefaultSampler": "here:DefaultSampler"},
    "mmengine.visualization": {n: f"here:{n}" for n in ("Visualizer", "LocalVisBackend", "TensorboardVisBackend")},
    "xtuner": {},
    "xtuner.dataset": {"process_hf_dataset": "evotune:process_hf_dataset",
                       **{n: f"evotune:{n}" for n in _INTERN_REPO}},
    "xtuner.dataset.huggingface": {"process_hf_dataset": "evotune:process_hf_dataset"},
    "xtuner.dataset.intern_repo": {n: f"evotune:{n}" for n in _INTERN_REPO},
    "xtuner.dataset.collate_fns": {"default_collate_fn": "here:default_collate_fn"},
    "xtuner.dataset.map_fns": {n: f"evotune:{n}" for n in _MAP_FNS},
    "xtuner.dataset.samplers": {"InternRepoSampler": "evotune:InternRepoSampler",
                                "InternlmRepoSampler": "evotune:InternRepoSampler"},
    "xtuner.engine": {**{n: f"here:{n}" for n in _XTUNER_HOOKS[:4]}, "TrainLoop": "here:TrainLoop"},
    "xtuner.engine.hooks": {n: f"here:{n}" for n in _XTUNER_HOOKS},
    "xtuner.engine.runner": {"TrainLoop": "here:TrainLoop"},
    "xtuner.model": {"SupervisedFinetune": "evotune:SupervisedFinetune"},
    "xtuner.parallel": {},
    "xtuner.parallel.sequence": {"SequenceParallelSampler": "evotune:SequenceParallelSampler"},
    "xtuner.utils": {"PROMPT_TEMPLATE": "evotune:PROMPT_TEMPLATE", "SYSTEM_TEMPLATE": "evotune:SYSTEM_TEMPLATE",
                     "IGNORE_INDEX": "value:-100", "DEFAULT_PAD_TOKEN_INDEX": "value:0"},
}
# installed packages where only some names change; the rest is the real module
OVERLAID: dict[str, dict[str, str]] = {
    "transformers": {"AutoModelForCausalLM": "here:AutoModelForCausalLM", "AutoTokenizer": "here:AutoTokenizer",
                     "BitsAndBytesConfig": "here:BitsAndBytesConfig"},
    "torch.utils.data": {"BatchSampler": "here:BatchSampler"},
}
# XTuner names evotune does not provide, and what to use instead
MISSING: dict[str, str] = {
    "xtuner.engine.DeepSpeedStrategy": "pass --deepspeed deepspeed_zero1/2/3 to `evotune train` (FSDP2 realises it)",
    "xtuner.model.LLaVAModel": "evotune trains causal language models only (no LLaVA)",
    "xtuner.model.InternVL_V1_5": "evotune trains causal language models only (no InternVL)",
    "xtuner.dataset.ConcatDataset": "give load_intern_repo_tokenized_dataset one folder with subfolders, "
                                    "weighted by dataset_weights",
    "xtuner.dataset.samplers.LengthGroupedSampler": "packs are all max_length tokens; use InternRepoSampler",
    "mmengine.optim.DeepSpeedOptimWrapper": "use AmpOptimWrapper and pass --deepspeed to `evotune train`",
    "mmengine.dataset.InfiniteSampler": "use DefaultSampler and train_cfg max_iters",
    "mmengine.visualization.WandbVisBackend": "use TensorboardVisBackend or evotune plot WORK_DIR",
    **{f"xtuner.parallel.sequence.{n}": _SP for n in (
        "init_sequence_parallel", "split_for_sequence_parallel", "gather_for_sequence_parallel",
        "reduce_sequence_parallel_loss", "get_sequence_parallel_world_size", "get_sequence_parallel_rank",
        "get_sequence_parallel_group", "pad_for_sequence_parallel", "sequence_parallel_wrapper")},
}


def _value(source: str) -> Any:
    kind, _, name = source.partition(":")
    if kind == "here":
        return globals()[name]
    if kind == "value":
        return int(name)
    if name not in evotune.__all__:
        raise AttributeError(name)
    return getattr(evotune, name)


class _ShimModule(types.ModuleType):
    """A stand-in module: its names come from :data:`MODULES` / :data:`OVERLAID`; never in ``sys.modules``."""

    def __init__(self, name: str, where: str):
        super().__init__(name)
        self.__where = where

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        name = self.__name__
        child = f"{name}.{attr}"
        if child in MODULES or child in OVERLAID:
            return _ShimModule(child, self.__where)
        table = MODULES.get(name, OVERLAID.get(name, {}))
        if attr in table:
            try:
                value = _value(table[attr])
            except AttributeError:
                raise EvotuneError(f"{self.__where}: {name}.{attr}: evotune does not provide {attr} (yet)") from None
            setattr(self, attr, value)
            return value
        if name in OVERLAID:
            return getattr(importlib.import_module(name), attr)
        instead = MISSING.get(child)
        provided = ", ".join(sorted(table)) or "no names (import its submodules)"
        raise EvotuneError(f"{self.__where}: `{name}.{attr}` is an XTuner/mmengine name that evotune does not "
                           f"provide; " + (instead if instead else f"from {name} evotune provides {provided}"))


def config_builtins(where: str) -> dict[str, Any]:
    """The builtins of a config file's namespace: Python's, with an ``__import__`` that resolves
    XTuner's and mmengine's modules to :class:`_ShimModule` objects. ``where``: the file, for messages."""
    real_import = builtins.__import__
    _said.clear()  # each run of a config says its notes once

    def config_import(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and (top in ("mmengine", "xtuner") or name in OVERLAID):
            if name not in MODULES and name not in OVERLAID:
                known = ", ".join(m for m in MODULES if m.startswith(top + "."))
                raise EvotuneError(f"{where}: `import {name}`: evotune provides no module {name} (XTuner configs "
                                   f"it runs use {known})")
            module = _ShimModule(name, where)
            for attr in fromlist or ():
                getattr(module, attr)  # a missing name: one line now, not Python's "cannot import name"
            return module if fromlist else _ShimModule(top, where)
        return real_import(name, globals, locals, fromlist, level)

    names = dict(vars(builtins))
    names["__import__"] = config_import
    return names


# --------------------------------------------------------------------------- reading the structure

HOOKS: dict[str, type[Marker]] = {cls.__name__: cls for cls in (
    CheckpointHook, LoggerHook, IterTimerHook, ParamSchedulerHook, DistSamplerSeedHook, EvaluateChatHook,
    DatasetInfoHook, ThroughputHook, VarlenAttnArgsToMessageHubHook, HFCheckpointHook)}
# hooks that need nothing from the settings: their presence is accepted (Marker.does says why)
ACCEPTED_HOOKS = ("IterTimerHook", "ParamSchedulerHook", "DistSamplerSeedHook", "ThroughputHook",
                  "VarlenAttnArgsToMessageHubHook", "HFCheckpointHook")
# default_hooks keys evotune reads (mmengine's names) and the hook each must be
DEFAULT_HOOKS = {"timer": "IterTimerHook", "logger": "LoggerHook", "param_scheduler": "ParamSchedulerHook",
                 "checkpoint": "CheckpointHook", "sampler_seed": "DistSamplerSeedHook"}
# places whose values count XTuner iterations (micro-batches); evotune counts optimizer steps
ITERATION_PLACES = ("default_hooks.checkpoint.interval", "default_hooks.logger.interval",
                    "custom_hooks.EvaluateChatHook.every_n_iters", "train_cfg.max_iters")


def type_name(spec_type: Any) -> str:
    return getattr(spec_type, "__name__", str(spec_type))


def _hook_of(spec: Any, where: str) -> str:
    if not (isinstance(spec, dict) and "type" in spec):
        raise EvotuneError(f"{where}: expected dict(type=<hook>, ...), got {spec!r}")
    name = spec["type"] if isinstance(spec["type"], str) else type_name(spec["type"])
    if name not in HOOKS or (not isinstance(spec["type"], str) and spec["type"] is not HOOKS[name]):
        raise EvotuneError(f"{where}: unknown hook {name}; evotune knows {', '.join(HOOKS)}")
    return name


def normalise(cfg: dict, sources) -> dict:
    """A copy of ``cfg`` with XTuner's structure in the places evotune's settings read.

    * ``custom_hooks`` (a list) becomes ``{hook name: its dict}``; an unknown
      hook is refused with the list of known ones, a hook given twice too;
    * ``default_hooks.<key>`` must hold the hook mmengine puts there;
    * hooks that need no setting (:data:`ACCEPTED_HOOKS`) are dropped once checked;
    * ``train_dataloader.dataset`` (what XTuner builds) becomes ``train_dataset``
      (two different ones are an error);
    * ``visualizer=dict(type=Visualizer, vis_backends=[...])`` becomes ``'tensorboard'`` or None.

    ``sources``: evotune.settings' source namer, for messages.
    """
    cfg = dict(cfg)
    hooks = cfg.get("custom_hooks")
    if hooks is not None:
        if not isinstance(hooks, (list, tuple)):
            raise EvotuneError(f"custom_hooks: expected a list of dict(type=<hook>, ...), got {hooks!r} "
                               f"({sources.of('custom_hooks')})")
        by_name: dict[str, dict] = {}
        for i, spec in enumerate(hooks):
            name = _hook_of(spec, f"custom_hooks[{i}] ({sources.of('custom_hooks')})")
            if name in by_name:
                raise EvotuneError(f"custom_hooks: {name} is given twice ({sources.of('custom_hooks')}); keep one")
            if name not in ACCEPTED_HOOKS:
                by_name[name] = spec
        cfg["custom_hooks"] = by_name
    defaults = cfg.get("default_hooks")
    if isinstance(defaults, dict):
        kept = {}
        for key, spec in defaults.items():
            if spec is None:
                continue
            where = f"default_hooks.{key} ({sources.of(f'default_hooks.{key}')})"
            name = _hook_of(spec, where)
            if DEFAULT_HOOKS.get(key, name) != name or key not in DEFAULT_HOOKS:
                expected = DEFAULT_HOOKS.get(key)
                raise EvotuneError(f"{where}: {name} " + (f"is not where {expected} goes" if expected else
                                   f"is not a key evotune reads; it reads {', '.join(DEFAULT_HOOKS)}"))
            if name not in ACCEPTED_HOOKS:
                kept[key] = spec
        cfg["default_hooks"] = kept
    loader = cfg.get("train_dataloader")
    if isinstance(loader, dict) and "dataset" in loader:
        loader = dict(loader)
        dataset = loader.pop("dataset")
        if "train_dataset" in cfg and cfg["train_dataset"] != dataset:
            raise EvotuneError(f"train_dataloader.dataset ({sources.of('train_dataloader.dataset')}) is not "
                               f"train_dataset ({sources.of('train_dataset')}); XTuner trains on "
                               "train_dataloader.dataset: make them one (dataset=train_dataset)")
        cfg["train_dataset"] = dataset
        cfg["train_dataloader"] = loader
    vis = cfg.get("visualizer")
    if isinstance(vis, dict) and vis.get("type") is Visualizer:
        backends = [type_name(b.get("type")) if isinstance(b, dict) else type_name(b)
                    for b in vis.get("vis_backends") or ()]
        unknown = [b for b in backends if b not in ("LocalVisBackend", "TensorboardVisBackend")]
        if unknown:
            raise EvotuneError(f"visualizer.vis_backends: {', '.join(unknown)} is not supported "
                               f"({sources.of('visualizer')}); use LocalVisBackend or TensorboardVisBackend")
        cfg["visualizer"] = "tensorboard" if "TensorboardVisBackend" in backends else None
    return cfg


def check_fixed(value: Any, where: str, source: str) -> None:
    """Every ``type=`` dict under ``value`` whose callable has ``fixed`` values: refuse what evotune cannot
    honour. ``where``: the dotted key of ``value``; ``source``: where it came from (for the message)."""
    if isinstance(value, dict):
        fixed = getattr(value.get("type"), "fixed", None)
        if fixed:
            try:
                params = inspect.signature(value["type"]).parameters
            except (TypeError, ValueError):
                params = {}
            for key, (allowed, why) in fixed.items():
                default = params[key].default if key in params else None
                given = value.get(key, default)
                if not any(given == a and type(given) is type(a) or given is a for a in allowed):
                    raise EvotuneError(f"{where}.{key}={given!r} ({source}): {why}")
        for k, v in value.items():
            check_fixed(v, f"{where}.{k}", source)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_fixed(v, f"{where}[{i}]", source)


def iterations_to_steps(value: int, accumulative_counts: int) -> int:
    """An XTuner interval in iterations (micro-batches) as optimizer steps: at least 1, rounded up."""
    return max(1, math.ceil(value / accumulative_counts))


# --------------------------------------------------------------------------- value checks of the XTuner keys
# evotune.settings' fields call these as check(value, key); each returns the value to use.


def is_a(*markers: type) -> Callable:
    """A ``dict(type=<one of markers>, ...)`` (or None); the value kept is the dict."""
    names = " or ".join(m.__name__ for m in markers)

    def check_is_a(value, key):
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get("type")
        if value not in markers:
            raise EvotuneError(f"{key}: expected {names}, got {type_name(value)}")
        return value
    check_is_a.reads_type_dict = True  # evotune.settings.plain_dicts: the keys are the callable's parameters
    return check_is_a


def only(allowed: tuple, why: str) -> Callable:
    """A value evotune honours, else refused with ``why``."""
    def check_only(value, key):
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise EvotuneError(f"{key}={value!r}: {why}")
        return value
    return check_only


def resume_flag(value, key):
    """mmengine's ``resume = True``: continue from the latest checkpoint of the work dir (``--resume auto``);
    a string is ``--resume``'s own value (``auto`` or a checkpoint path)."""
    if value is None or isinstance(value, bool):
        return "auto" if value else None
    if not isinstance(value, str) or not value:
        raise EvotuneError(f"{key}: expected True, False, 'auto' or a checkpoint path, got {value!r}")
    return value


def loss_scale(value, key):
    """AmpOptimWrapper's ``loss_scale``: ``'dynamic'``, a number (static scale) or GradScaler's arguments
    (``init_scale``, ``growth_factor``, ``backoff_factor``, ``growth_interval``), as one dict."""
    fields = {"init_scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    if value == "dynamic":
        return {**fields, "dynamic": True}
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return {**fields, "init_scale": float(value), "dynamic": False}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(fields) - {"enabled"})
        if unknown:
            raise EvotuneError(f"{key}: '{unknown[0]}' is not a loss scaler argument; it takes "
                               f"{', '.join(fields)}")
        if value.get("enabled", True) is not True:
            raise EvotuneError(f"{key}.enabled=False: float16 compute needs loss scaling; use bfloat16 instead")
        return {**fields, **{k: v for k, v in value.items() if k != "enabled"}, "dynamic": True}
    raise EvotuneError(f"{key}: expected 'dynamic', a number > 0 or a dict of {', '.join(fields)}, got {value!r}")


def log_processor(value, key):
    """mmengine's ``log_processor``: evotune logs each step's own values, by iteration."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise EvotuneError(f"{key}: expected a dict, got {value!r}")
    rules = {"by_epoch": ((False,), "evotune logs by iteration; set by_epoch=False"),
             "window_size": ((1,), "evotune logs each step's own values, no moving average; set window_size=1")}
    for k, v in value.items():
        if k == "mean_pattern":  # which values the window averages: with a window of 1, each step's own
            if not isinstance(v, str):
                raise EvotuneError(f"{key}.mean_pattern: expected a regular expression string, got {v!r}")
        elif k in rules:
            only(*rules[k])(v, f"{key}.{k}")
        else:
            raise EvotuneError(f"{key}: '{k}' is not supported (evotune reads by_epoch, window_size, mean_pattern)")
    return value
