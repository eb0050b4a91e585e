"""PEFT LoRA adapter directories: written in the base model's layout, read back, merged into a base.

A PEFT adapter directory is ``adapter_config.json`` (a ``LoraConfig`` as JSON)
and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``; ``peft.PeftModel.from_pretrained(base, dir)``
adds ``scaling * B @ A`` to each named module's weight, where ``scaling`` is
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module
from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches
(:func:`module_scaling`).

evotune trains an InternLM2 base as a native Llama (evotune/model/internlm2.py),
so its adapter is in Llama names. :func:`to_internlm2` maps it back to the
names the published InternLM2 model has (docs/lora.md, "InternLM2"):
``o_proj -> attention.wo``, ``gate_proj -> feed_forward.w1``, ``up_proj -> w3``,
``down_proj -> w2``, and q/k/v -> one ``attention.wqkv`` adapter. ``wqkv``'s
rows are grouped per key/value head (evotune/checkpoint/internlm2.py,
:func:`merge_wqkv`). When q, k and v share one A (what evotune trains on an
InternLM2 base by default, XTuner's adapter: evotune/model/lora.py), it is the
rank-r adapter ``(A, merge_wqkv(B_q, B_k, B_v))``. Independent A matrices (q, k
and v named in Llama names) have no exact rank-r equivalent: the single adapter
then has rank ``r_q + r_k + r_v``: ``A`` is the three A's stacked, ``B`` holds
each projection's B in its rows of the grouped layout and in its own block of
columns (zeros elsewhere), so that ``B @ A = merge_wqkv(B_q A_q, B_k A_k, B_v
A_v)``. Its ``rank_pattern`` / ``alpha_pattern`` entry keeps the scaling of q
(k's and v's blocks are rescaled if theirs differs).

:func:`merge_into_plan` adds an adapter to a base's weights as a plan
(evotune/checkpoint/plan.py): one tensor at a time, in the base's own layout;
:func:`merge_adapter` writes that merged folder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evotune.checkpoint.atomic import AtomicDir
from evotune.checkpoint.hf import DEFAULT_SHARD_BYTES, LazyWeights, write_hf_dir
from evotune.checkpoint.internlm2 import merge_wqkv
from evotune.checkpoint.plan import Planned
from evotune.checkpoint.source import detect_format, read_config_json
from evotune.errors import EvotuneError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")

# Llama module names -> InternLM2's (q/k/v are merged into attention.wqkv)
INTERNLM2_MODULES = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                     "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER = re.compile(r"^(model\.layers\.\d+)\.(.+)$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching the module path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: dict, module: str) -> float:
    """The factor PEFT puts on ``B @ A`` for ``module`` (a path such as ``model.layers.0.self_attn.q_proj``)."""
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    return scaling * (math.sqrt(r) if rslora else r)


def _one_a(parts, scales) -> bool:
    """q, k and v with the same A and scaling (evotune/model/lora.py shares A for an InternLM2 base):
    then ``merge_wqkv(B_q, B_k, B_v) @ A`` is the whole update, a rank-r adapter on wqkv (XTuner's)."""
    a = parts[0][1][0]
    return len(set(scales)) == 1 and all(torch.equal(pair[0], a) for _, pair in parts[1:])


def to_internlm2(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict, heads: int,
                 kv_heads: int) -> tuple[dict, dict]:
    """Llama-named adapter ``{module path: (A, B)}`` + config -> InternLM2 names (module docstring)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank_pattern, alpha_pattern = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    if rank_pattern or alpha_pattern:
        raise EvotuneError("lora rank_pattern/alpha_pattern cannot be mapped to InternLM2 names: train without them")
    layers = sorted({m.group(1) for m in map(_LAYER.match, modules) if m})
    rslora = bool(config.get("use_rslora"))
    for layer in layers:
        parts = [(name, modules[f"{layer}.{name}"]) for name in QKV if f"{layer}.{name}" in modules]
        if len(parts) == 3 and _one_a(parts, [module_scaling(config, f"{layer}.{n}") for n, _ in parts]):
            (a, b_q), (_, b_k), (_, b_v) = (pair for _, pair in parts)
            out[f"{layer}.attention.wqkv"] = (a, merge_wqkv(b_q, b_k, b_v, heads, kv_heads))
        elif parts:
            head_dim = next(b.shape[0] // (heads if n == QKV[0] else kv_heads) for n, (_, b) in parts)
            dims = {QKV[0]: heads * head_dim, QKV[1]: kv_heads * head_dim, QKV[2]: kv_heads * head_dim}
            scale = module_scaling(config, f"{layer}.{parts[0][0]}")
            rank = sum(a.shape[0] for _, (a, _) in parts)
            a_all = torch.cat([a for _, (a, _) in parts])
            blocks, col = {}, 0
            for name, (a, b) in parts:
                block = torch.zeros(b.shape[0], rank, dtype=b.dtype)
                block[:, col:col + a.shape[0]] = b * (module_scaling(config, f"{layer}.{name}") / scale)
                blocks[name] = block
                col += a.shape[0]
            q, k, v = (blocks.get(n, torch.zeros(dims[n], rank, dtype=a_all.dtype)) for n in QKV)
            out[f"{layer}.attention.wqkv"] = (a_all, merge_wqkv(q, k, v, heads, kv_heads))
            rank_pattern["attention.wqkv"] = rank
            alpha_pattern["attention.wqkv"] = _alpha_for(scale, rank, rslora)
    for path, pair in modules.items():
        m = _LAYER.match(path)
        if m and m.group(2) in QKV:
            continue
        if not m or m.group(2) not in INTERNLM2_MODULES:
            raise EvotuneError(f"LoRA on {path} has no InternLM2 name: export with save_format='huggingface'")
        out[f"{m.group(1)}.{INTERNLM2_MODULES[m.group(2)]}"] = pair
    names = {p.rsplit(".", 1)[1] for p in out}
    cfg = {**config, "target_modules": sorted(names), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return out, cfg


def write_adapter(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict, out_dir,
                  overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a PEFT adapter directory atomically (evotune/checkpoint/atomic.py)."""
    tensors = {}
    for path, (a, b) in modules.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu", dtype or a.dtype).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().to("cpu", dtype or b.dtype).contiguous()
    need = sum(t.nbytes for t in tensors.values())
    with AtomicDir(out_dir, overwrite=overwrite, need_bytes=need) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def is_adapter(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_adapter(path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """``({module path: (A, B)}, adapter_config)`` of a PEFT LoRA adapter directory."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() or not (p / WEIGHTS_NAME).is_file():
        raise EvotuneError(f"{p} is not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads((p / CONFIG_NAME).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise EvotuneError(f"{p / CONFIG_NAME}: peft_type {config.get('peft_type')!r}; only LoRA adapters merge")
    for key, bad in (("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise EvotuneError(f"{p / CONFIG_NAME}: {key}={bad} is not a plain LoRA adapter; merge it with peft")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(p / WEIGHTS_NAME)).items():
        m = _KEY.match(key)
        if m is None:
            raise EvotuneError(f"{p / WEIGHTS_NAME}: {key} is not a LoRA A/B weight; merge it with peft")
        halves.setdefault(m.group(1), {})[m.group(2)] = t
    return {path: (h["A"], h["B"]) for path, h in halves.items()}, config


def merge_into_plan(plan: dict[str, Planned], modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    config: dict, where: str) -> dict[str, Planned]:
    """``W + scaling * B @ A`` for each adapted ``<module>.weight`` of ``plan`` (computed in fp32,
    stored in the weight's dtype); the other tensors pass through untouched."""
    out = dict(plan)
    for path, (a, b) in modules.items():
        key = f"{path}.weight"
        if key not in plan:
            raise EvotuneError(f"{where}: the adapter changes {path} but the base has no {key}: "
                               "this adapter was trained on another model")
        p = plan[key]
        if tuple(p.shape) != (b.shape[0], a.shape[1]):
            raise EvotuneError(f"{where}: {key} is {list(p.shape)} but the adapter's B @ A is "
                               f"{[b.shape[0], a.shape[1]]}: this adapter was trained on another model")
        scale = module_scaling(config, path)

        def load(p=p, a=a, b=b, scale=scale):
            w = p.load()
            return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)

        out[key] = Planned(p.shape, p.dtype, load)
    return out


def merge_adapter(base, adapter, out, *, dtype=None, max_shard_bytes: int | None = None,
                  overwrite: bool = False) -> Path:
    """A local base folder + PEFT LoRA adapter -> a folder in the base's own layout (an InternLM2 base stays
    InternLM2: its adapter is in InternLM2 names), streamed one tensor at a time. ``evotune convert merge``
    and the end of a ``save_merged`` training run (evotune/train/loop.py) both write with it."""
    base = Path(base)
    if detect_format(base) == "internevo":
        raise EvotuneError(f"{base}: an InternEvo checkpoint; convert it with 'evotune convert internevo2hf' first "
                           "and merge the adapter into that folder")
    modules, config = read_adapter(adapter)
    plan = merge_into_plan(LazyWeights(base).plan(), modules, config, where=str(adapter))
    extra = tuple(sorted(base.glob("*.py")))  # an InternLM2 base's remote code, if it had it
    gen = base / "generation_config.json"
    return write_hf_dir(plan, read_config_json(base), out, dtype=dtype, extra_files=extra + ((gen,) if gen.is_file()
                        else ()), tokenizer_path=base, overwrite=overwrite,
                        max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)


def export_adapter(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict, out_dir, *,
                   source_format: str | None, heads: int, kv_heads: int, save_format: str | None = None,
                   overwrite: bool = False) -> Path:
    """Write a trained adapter (transformers' Llama names) in the layout its base came in: InternLM2
    names for an InternLM2 or InternEvo source (``save_format='huggingface'``: Llama names), else as is.

    An InternEvo source has no Hugging Face folder for peft to load: the adapter
    fits that checkpoint converted with ``evotune convert internevo2hf`` (docs/lora.md).
    """
    fmt = save_format or ("internlm2" if source_format in ("internlm2", "internevo") else "huggingface")
    if fmt == "internlm2":
        modules, config = to_internlm2(modules, config, heads, kv_heads)
    elif fmt != "huggingface":
        raise EvotuneError(f"unknown save format {save_format!r}: use internlm2 or huggingface")
    return write_adapter(modules, config, out_dir, overwrite=overwrite)
