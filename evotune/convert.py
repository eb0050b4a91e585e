"""``evotune convert``: move weights between InternEvo, InternLM2 and Hugging Face layouts.

    evotune convert internevo2hf SRC DST [--save-format internlm2|huggingface] [--dtype bfloat16]
    evotune convert hf2internevo SRC DST --tp N --pp M [--dtype ...]
    evotune convert pth_to_hf WORK_DIR_OR_CKPT DST [--save-format ...]
    evotune convert pth_to_hf CONFIG CKPT SAVE_DIR [--fp32]       (XTuner's order: float16 unless --fp32)
    evotune convert merge BASE ADAPTER OUT [--dtype ...] [--max-shard-size 5GB]   (base + LoRA adapter)

``pth_to_hf`` on a LoRA run's checkpoint writes its PEFT adapter directory
(docs/lora.md); ``merge`` writes base + adapter in the base's own layout.

The command sits above the formats it joins (:mod:`evotune.checkpoint`) and
needs no model: every conversion streams tensors through plans
(:mod:`evotune.checkpoint.plan`), so memory stays near one pipeline stage / one
output shard, never two copies of the model. Outputs are written atomically
and never over a non-empty directory unless ``--overwrite`` is given
(docs/models.md, "evotune convert").
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from evotune.checkpoint.adapter import export_adapter, merge_adapter
from evotune.checkpoint.dcp import HF_CONFIG, TRAINER_STATE, checkpoints_dir, list_checkpoints, model_plan
from evotune.checkpoint.hf import DEFAULT_SHARD_BYTES, LazyWeights, export_plan, write_hf_dir
from evotune.checkpoint.internevo import InternEvoCheckpoint, config_for_json, write_internevo
from evotune.checkpoint.internlm2 import (
    internlm2_config_from_llama,
    llama_config_from_internlm2,
    plan_internlm2_to_llama,
    plan_llama_to_internlm2,
)
from evotune.checkpoint.source import ModelSource, detect_format, read_config_json
from evotune.dtypes import dtype_name, parse_dtype
from evotune.errors import EvotuneError
from evotune.model import hub
from evotune.model.lora import adapter_modules
from evotune.settings import load_settings
from evotune.xtuner_compat import tokenizer_path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.I)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise EvotuneError(f"--max-shard-size {text!r}: write a size such as 5GB or 500MB")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper()))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint folder")
    p.add_argument("dst", help="output folder (must be new or empty, unless --overwrite)")
    p.add_argument("--dtype", default=None, help="cast floating weights: bfloat16, float16, float32 (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _hf_out(p: argparse.ArgumentParser, *formats: str) -> None:
    p.add_argument("--save-format", choices=("internlm2", "huggingface", *formats), default=None,
                   help="InternLM2 layout (default for InternEvo sources) or transformers' native Llama layout")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or .model file to copy into the output")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("internevo2hf", help="InternEvo model_tp*_pp*.pt folder -> Hugging Face folder")
    _common(a)
    _hf_out(a)
    a.add_argument("--ffn-layout", choices=("auto", "w2_down", "w3_down"), default="auto",
                   help="which of w2/w3 is the MLP down projection: auto (from shapes), w2_down (InternLM2, "
                        "InternEvo from 2024), w3_down (InternEvo before 2024)")
    a.add_argument("--max-position-embeddings", type=int, default=None,
                   help="written to config.json (default: model_config.pt's value, else 32768)")
    a.add_argument("--rope-scaling", choices=("dynamic", "linear"), default=None,
                   help="rope scaling to record in config.json (InternEvo trains without one)")
    a.add_argument("--rope-scaling-factor", type=float, default=None)
    b = sub.add_parser("hf2internevo", help="Hugging Face / InternLM2 / InternEvo folder -> InternEvo tp x pp shards")
    _common(b)
    b.add_argument("--tp", type=int, required=True, help="tensor-parallel size (divides kv heads and vocab)")
    b.add_argument("--pp", type=int, required=True, help="pipeline-parallel size (at most num_layers)")
    c = sub.add_parser("pth_to_hf", help="evotune training checkpoint (work dir or step folder) -> Hugging Face; "
                                         "XTuner's order CONFIG CKPT SAVE_DIR works too")
    _common(c)
    c.add_argument("save_dir", nargs="?", help="XTuner's order (pth_to_hf CONFIG CKPT SAVE_DIR): the output folder; "
                                               "the config gives the tokenizer copied into it")
    _hf_out(c, *XTUNER_SAVE_FORMATS)
    c.add_argument("--fp32", action="store_true", help="XTuner's flag: write float32 (XTuner's order writes "
                                                       "float16 otherwise)")
    c.add_argument("--safe-serialization", action="store_true",
                   help="XTuner's flag, accepted: evotune always writes safetensors")
    c.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="with CONFIG: overrides, as for evotune train")
    d = sub.add_parser("merge", help="base model + PEFT LoRA adapter -> merged model in the base's layout")
    d.add_argument("base", help="the base model folder (Hugging Face or InternLM2) the adapter was trained on")
    d.add_argument("adapter", help="the PEFT adapter folder (e.g. <work_dir>/hf_adapter)")
    d.add_argument("out", help="output folder (must be new or empty, unless --overwrite)")
    d.add_argument("--dtype", default=None, help="cast floating weights (default: the base's)")
    d.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c.add_argument("--model", default=None,
                   help="the model folder the training started from (default: the checkpoint's hf_config.json "
                        "and trainer_state.json)")


def main(args: argparse.Namespace) -> int:
    dtype = parse_dtype(args.dtype, what="--dtype")
    if args.direction == "internevo2hf":
        scaling = None
        if args.rope_scaling:
            if args.rope_scaling_factor is None:
                raise EvotuneError("--rope-scaling needs --rope-scaling-factor (e.g. 2.0)")
            scaling = {"type": args.rope_scaling, "factor": args.rope_scaling_factor}
        out = internevo2hf(args.src, args.dst, save_format=args.save_format or "internlm2", dtype=dtype,
                           ffn_layout=args.ffn_layout, max_position_embeddings=args.max_position_embeddings,
                           rope_scaling=scaling, tokenizer_path=args.tokenizer,
                           max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite)
    elif args.direction == "merge":
        out = merge(args.base, args.adapter, args.out, dtype=dtype, max_shard_bytes=parse_size(args.max_shard_size),
                    overwrite=args.overwrite)
    elif args.direction == "hf2internevo":
        out = hf2internevo(args.src, args.dst, tp=args.tp, pp=args.pp, dtype=dtype, overwrite=args.overwrite)
    else:
        src, dst, tokenizer = args.src, args.dst, args.tokenizer
        if args.save_dir is not None:  # XTuner's order: CONFIG CKPT SAVE_DIR
            src, dst = args.dst, args.save_dir
            tokenizer = tokenizer or config_tokenizer(args.src, args.cfg_options)
            dtype = dtype or torch.float16
        elif args.cfg_options:
            raise EvotuneError("pth_to_hf: --cfg-options needs a CONFIG (pth_to_hf CONFIG CKPT SAVE_DIR)")
        if args.fp32:
            dtype = torch.float32
        out = pth_to_hf(src, dst, model_path=args.model, save_format=XTUNER_SAVE_FORMATS.get(args.save_format,
                                                                                            args.save_format),
                        dtype=dtype, tokenizer_path=tokenizer,
                        max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


# XTuner's pth_to_hf --save-format: 'xtuner' and 'official' keep the layout the training started from
XTUNER_SAVE_FORMATS = {"xtuner": None, "official": None}


def config_tokenizer(config: str, cfg_options: list[str]) -> str | None:
    """The tokenizer folder a training config names (``tokenizer`` dict's path or hub id, resolved)."""
    path = tokenizer_path(load_settings(config, cfg_options).model.tokenizer)
    return str(hub.resolve(path, tokenizer_only=True)) if path else None


def internevo2hf(src, dst, *, save_format: str = "internlm2", dtype=None, ffn_layout: str = "auto",
                 max_position_embeddings: int | None = None, rope_scaling: dict | None = None,
                 tokenizer_path=None, max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """An InternEvo checkpoint folder (any tp/pp) -> a HF folder (InternLM2 or native Llama layout)."""
    _require_dir(src)
    ckpt = InternEvoCheckpoint(src, ffn_layout)
    cfg = ckpt.internlm2_config(max_position_embeddings, rope_scaling, dtype)
    plan = ckpt.plan()
    if save_format == "huggingface":
        plan = plan_internlm2_to_llama(plan, ckpt.heads, ckpt.kv_heads)
        cfg = _native_config(llama_config_from_internlm2(cfg))
    elif save_format != "internlm2":
        raise EvotuneError(f"--save-format {save_format!r}: use internlm2 or huggingface")
    return write_hf_dir(plan, cfg, dst, dtype=dtype, tokenizer_path=tokenizer_path, overwrite=overwrite,
                        max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)


def _native_config(llama_config) -> dict:
    cfg = llama_config.to_diff_dict()
    cfg["dtype"] = dtype_name(parse_dtype(llama_config.dtype, torch.float32))
    return cfg


def _require_dir(path) -> None:
    p = Path(path)
    if not p.is_dir():
        raise EvotuneError(f"{p} is not a directory: give the checkpoint folder")


def internlm2_source(src):
    """(plan in InternLM2 names, InternLM2 config dict) for any folder evotune reads."""
    fmt = detect_format(src)
    if fmt == "internevo":
        ckpt = InternEvoCheckpoint(src)
        return ckpt.plan(), ckpt.internlm2_config()
    cfg = read_config_json(Path(src))
    if fmt == "internlm2":
        return LazyWeights(src).plan(), cfg
    if cfg.get("model_type") != "llama":
        raise EvotuneError(
            f"{Path(src) / 'config.json'}: model_type {cfg.get('model_type')!r} cannot become an InternEvo "
            "InternLM2 checkpoint; only internlm2 and llama models can"
        )
    from transformers import LlamaConfig

    llama = LlamaConfig.from_dict(cfg)
    plan = LazyWeights(src).plan()
    if "lm_head.weight" not in plan and llama.tie_word_embeddings:
        plan["lm_head.weight"] = plan["model.embed_tokens.weight"]  # InternEvo has no tied head
    return plan_llama_to_internlm2(plan, llama.num_attention_heads, llama.num_key_value_heads), \
        internlm2_config_from_llama(llama)


def hf2internevo(src, dst, *, tp: int, pp: int, dtype=None, overwrite: bool = False) -> Path:
    """A HF InternLM2/Llama folder (or an InternEvo folder, to re-split it) -> InternEvo tp x pp shards."""
    _require_dir(src)
    plan, cfg = internlm2_source(src)
    return write_internevo(plan, cfg, dst, tp, pp, dtype=dtype, overwrite=overwrite)


def find_training_checkpoint(src) -> Path:
    """A DCP step folder: ``src`` itself, or the newest ``step_<N>`` of ``<src>/checkpoints`` or of ``src``."""
    p = Path(src)
    if (p / ".metadata").is_file():
        return p
    found = list_checkpoints(checkpoints_dir(str(p))) or list_checkpoints(str(p))
    if not found:
        raise EvotuneError(
            f"{p} is not an evotune training checkpoint: expected a step folder with .metadata or a work dir "
            "with checkpoints/step_<N>/"
        )
    return Path(found[-1][1])


def _source_for(step_dir: Path, model_path) -> tuple[ModelSource | None, object]:
    """(source record, transformers config or dict) for an exported checkpoint.

    Without ``model_path``: the trainer's ``hf_config.json`` and the
    ``model_source`` of ``trainer_state.json`` in the step folder
    (see :mod:`evotune.checkpoint.dcp`).
    """
    if model_path is None:
        if not (step_dir / HF_CONFIG).is_file():
            raise EvotuneError(
                f"{step_dir}: no {HF_CONFIG} in the checkpoint; pass --model with the folder the "
                "training started from (it gives the config, layout and tokenizer)"
            )
        config = json.loads((step_dir / HF_CONFIG).read_text())
        state_file = step_dir / TRAINER_STATE
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        return ModelSource.from_json(state.get("model_source"), where=f"{state_file} model_source"), config
    fmt = detect_format(model_path)
    if fmt == "internevo":
        ckpt = InternEvoCheckpoint(model_path)
        return (ModelSource(fmt, str(model_path), config_for_json(ckpt.config)),
                llama_config_from_internlm2(ckpt.internlm2_config()))
    cfg = read_config_json(Path(model_path))
    source = ModelSource(fmt, str(model_path), cfg)
    return source, (llama_config_from_internlm2(cfg) if fmt == "internlm2" else cfg)


def pth_to_hf(src, dst, *, model_path=None, save_format: str | None = None, dtype=None, tokenizer_path=None,
              max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """An evotune training checkpoint (DCP) -> a HF folder in the layout the training started from.

    ``src``: a ``step_<N>`` folder or a work dir (its newest checkpoint).
    The config and layout come from the checkpoint's ``hf_config.json`` and
    ``trainer_state.json`` (``model_source``), or from ``model_path``, the
    folder the training started from.
    """
    step_dir = find_training_checkpoint(src)
    source, config = _source_for(step_dir, model_path)
    lora = json.loads((step_dir / TRAINER_STATE).read_text()).get("lora") if (step_dir / TRAINER_STATE).is_file() \
        else None
    if lora:  # a LoRA run's checkpoint holds the adapter only: write it as a PEFT directory
        modules = adapter_modules({k: p.load() for k, p in model_plan(str(step_dir)).items()})
        cfg = config if isinstance(config, dict) else config.to_dict()
        return export_adapter(modules, lora, dst, source_format=source.format if source else None,
                              heads=cfg["num_attention_heads"],
                              kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                              save_format=save_format, overwrite=overwrite)
    return export_plan(model_plan(str(step_dir)), config, dst, source=source, save_format=save_format, dtype=dtype,
                       tokenizer_path=tokenizer_path, overwrite=overwrite,
                       max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)


def merge(base, adapter, out, *, dtype=None, max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Base (a folder or hub id) + PEFT LoRA adapter -> a folder in the base's own layout (XTuner's
    ``xtuner convert merge``; :func:`evotune.checkpoint.adapter.merge_adapter`)."""
    return merge_adapter(hub.resolve(base), adapter, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite)
