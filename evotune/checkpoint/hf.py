"""Hugging Face model directories: safetensors read and written one tensor at a time.

Everything here works on plans (:mod:`evotune.checkpoint.plan`), so a 7B
conversion never holds two copies of the weights. :class:`LazyWeights` reads
safetensors shards with plain file reads (no memory map, so resident memory is
the tensors in flight, not the pages touched), and :func:`write_safetensors`
streams a plan into shards: it writes each shard's header from the planned
shapes, then the tensors one by one.

:func:`save_hf` writes a model or a full state dict as a HF directory, in the
layout the model came in (its :class:`~evotune.checkpoint.source.ModelSource`)
or in transformers' native layout, atomically
(:class:`~evotune.checkpoint.atomic.AtomicDir`). docs/models.md describes the
result.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from evotune.checkpoint.atomic import AtomicDir
from evotune.checkpoint.internlm2 import internlm2_config_from_llama, llama_config_of, plan_llama_to_internlm2
from evotune.checkpoint.plan import Planned, plan_of
from evotune.checkpoint.source import ModelSource
from evotune.dtypes import dtype_name, parse_dtype
from evotune.errors import EvotuneError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3

# the files a tokenizer is saved as (transformers' fast and slow tokenizers, sentencepiece, InternLM2):
# a folder holding any of them has a tokenizer; an export copies every one present
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class _SafetensorsFile:
    """One ``.safetensors`` file read with ``readinto`` (no mmap)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvotuneError(f"{path}: not a safetensors file ({e}); re-download or re-convert it") from e
        self.base = 8 + n
        header.pop("__metadata__", None)
        self.entries = {}
        for name, info in header.items():
            if info["dtype"] not in _ST_DTYPES:
                raise EvotuneError(f"{path}: tensor {name} has dtype {info['dtype']}, which evotune does not read")
            self.entries[name] = (tuple(info["shape"]), _ST_DTYPES[info["dtype"]], info["data_offsets"])

    def read(self, name: str) -> torch.Tensor:
        shape, dtype, (begin, end) = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            if end > begin and f.readinto(buf.numpy()) != end - begin:
                raise EvotuneError(f"{self.path}: truncated while reading {name}; the file is incomplete")
        return buf.view(dtype).reshape(shape)


class LazyWeights(Mapping):
    """A read-only ``name -> tensor`` mapping over a HF directory's weight shards.

    ``.plan()`` gives shapes and dtypes without reading any tensor data.
    ``.bin`` shards are memory-mapped with ``torch.load(mmap=True, weights_only=True)``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._where: dict[str, object] = {}
        files = sorted(self.path.glob("*.safetensors"))
        index = self.path / INDEX_NAME
        if index.is_file():
            listed = set(json.loads(index.read_text())["weight_map"].values())
            missing = sorted(f for f in listed if not (self.path / f).is_file())
            if missing:
                raise EvotuneError(f"{index} lists {missing[0]} but that file is missing: copy every shard")
        if files:
            for f in files:
                st = _SafetensorsFile(f)
                for key in st.entries:
                    self._where[key] = st
        else:
            files = sorted(self.path.glob("pytorch_model*.bin"))
            for f in files:
                shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                for key in shard:
                    self._where[key] = shard
        if not files:
            raise EvotuneError(f"{self.path} holds no weights (*.safetensors or pytorch_model*.bin)")

    def __getitem__(self, key: str) -> torch.Tensor:
        src = self._where[key]
        return src[key] if isinstance(src, dict) else src.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def plan(self) -> dict[str, Planned]:
        out = {}
        for key, src in self._where.items():
            if isinstance(src, dict):
                t = src[key]
                out[key] = Planned(tuple(t.shape), t.dtype, (lambda key=key: self[key]))
            else:
                shape, dtype, _ = src.entries[key]
                out[key] = Planned(shape, dtype, (lambda key=key: self[key]))
        return out


def _shards(plan: Mapping[str, Planned], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, p in plan.items():
        if shards[-1] and used + p.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += p.nbytes
    return shards


def _write_one(path: Path, names: list[str], plan: Mapping[str, Planned]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        p = plan[n]
        header[n] = {"dtype": _ST_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            p = plan[n]
            t = p.load().detach().to("cpu")
            if t.dtype != p.dtype:
                t = t.to(p.dtype)
            if tuple(t.shape) != p.shape:
                raise RuntimeError(f"planned {n} as {p.shape} but produced {tuple(t.shape)}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t


def write_safetensors(
    plan: Mapping[str, Planned], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype=None
) -> None:
    """Stream ``plan`` into ``model.safetensors`` or numbered shards + index.

    Memory: one tensor at a time. ``dtype`` casts floating tensors.
    """
    if dtype is not None:
        plan = {
            k: Planned(p.shape, dtype, p.load) if p.dtype.is_floating_point else p for k, p in plan.items()
        }
    groups = _shards(plan, max_shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = WEIGHTS_NAME if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_one(out_dir / fname, group, plan)
        weight_map.update({n: fname for n in group})
    if len(groups) > 1:
        total = sum(p.nbytes for p in plan.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files as they are (an InternLM2 tokenizer stays loadable by load_tokenizer)."""
    if src.is_file() and src.suffix == ".model":
        shutil.copy2(src, dst / "tokenizer.model")
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_hf_dir(
    plan: Mapping[str, Planned],
    config: dict,
    out_dir,
    *,
    dtype=None,
    extra_files: tuple[Path, ...] = (),
    generation_config: dict | None = None,
    tokenizer_path=None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """The common writer: weights from a plan, ``config.json`` as given, extra files copied."""
    need = sum(p.nbytes if dtype is None or not p.dtype.is_floating_point else p.nbytes // p.dtype.itemsize
               * dtype.itemsize for p in plan.values())
    with AtomicDir(out_dir, overwrite=overwrite, need_bytes=need) as tmp:
        write_safetensors(plan, tmp, max_shard_bytes, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2, sort_keys=True) + "\n")
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        if tokenizer_path is not None:
            _copy_tokenizer(Path(tokenizer_path), tmp)
    return Path(out_dir)


def save_hf(
    model_or_state_dict,
    out_dir,
    *,
    config=None,
    source: ModelSource | None = None,
    save_format: str | None = None,
    tokenizer_path=None,
    dtype=None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face directory (safetensors + config.json [+ generation_config, tokenizer]).

    ``model_or_state_dict``: a transformers model, or a full state dict in
    transformers' layout (as the distributed trainer gathers it) together with
    ``config`` (a ``PretrainedConfig`` or its dict) and/or ``source``.
    ``source``: where the model came from (default: the model's
    :meth:`ModelSource.of`; None: transformers' layout).
    ``save_format``: None = the layout the model came in (an InternLM2 or
    InternEvo model is written as InternLM2: same keys, same config fields,
    ``auto_map`` kept, remote-code ``.py`` files copied), 'internlm2', or
    'huggingface' (transformers' native layout).
    ``tokenizer_path``: tokenizer files to copy (default: the source directory).
    ``dtype``: cast floating tensors (default: as they are).
    Refuses a non-empty ``out_dir`` unless ``overwrite=True``.
    """
    is_model = isinstance(model_or_state_dict, torch.nn.Module)
    model = model_or_state_dict if is_model else None
    if source is None and model is not None:
        source = ModelSource.of(model)
    if config is None and model is not None:
        config = model.config
    if config is None:
        raise EvotuneError("save_hf: a state dict needs config= (the model's PretrainedConfig or config dict)")
    state = model.state_dict() if is_model else dict(model_or_state_dict)
    gen = getattr(model, "generation_config", None) if model is not None else None
    return export_plan(
        plan_of(state),
        config,
        out_dir,
        source=source,
        save_format=save_format,
        tokenizer_path=tokenizer_path,
        dtype=dtype,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        generation_config=gen.to_diff_dict() if gen is not None else None,
    )


def export_plan(
    plan: dict[str, Planned],
    config,
    out_dir,
    *,
    source: ModelSource | None = None,
    save_format: str | None = None,
    tokenizer_path=None,
    dtype=None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    generation_config: dict | None = None,
) -> Path:
    """:func:`save_hf` for weights given as a plan in transformers names (streamed, never all in memory)."""
    source_format = source.format if source is not None else None
    fmt = save_format or ("internlm2" if source_format in ("internlm2", "internevo") else "huggingface")
    if fmt not in ("internlm2", "huggingface"):
        raise EvotuneError(f"unknown save format {save_format!r}: use internlm2 or huggingface")
    out_dtype = parse_dtype(dtype)
    plan = {k: p for k, p in plan.items() if not k.endswith("rotary_emb.inv_freq")}
    floats = [p.dtype for p in plan.values() if p.dtype.is_floating_point]
    out_dtype_name = dtype_name(out_dtype or (floats[0] if floats else torch.float32))
    source_dir = Path(source.path) if source is not None and source.path else None
    extra: tuple[Path, ...] = ()

    if fmt == "internlm2":
        llama_config = llama_config_of(config)
        base = source.config if source_format == "internlm2" else None
        cfg_out = internlm2_config_from_llama(llama_config, base)
        cfg_out["torch_dtype"] = out_dtype_name
        if llama_config.tie_word_embeddings:
            plan.pop("lm_head.weight", None)
        plan = plan_llama_to_internlm2(plan, llama_config.num_attention_heads, llama_config.num_key_value_heads)
        if source_dir is not None and source_format == "internlm2" and source_dir.is_dir():
            extra = tuple(sorted(source_dir.glob("*.py")))  # the remote code, if the source had it
    else:
        cfg_out = dict(config) if isinstance(config, dict) else config.to_diff_dict()
        cfg_out.pop("torch_dtype", None)
        cfg_out["dtype"] = out_dtype_name
        if cfg_out.get("tie_word_embeddings"):
            plan.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the loader re-ties
    generation_config = _generation_config(generation_config, source_dir)
    return write_hf_dir(
        plan,
        cfg_out,
        out_dir,
        dtype=out_dtype,
        extra_files=extra,
        generation_config=generation_config,
        tokenizer_path=tokenizer_path if tokenizer_path is not None else source_dir,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
    )


def _generation_config(current: dict | None, source_dir: Path | None) -> dict | None:
    """The source's generation_config.json as it was, unless the model's own differs from it."""
    file = source_dir / "generation_config.json" if source_dir is not None else None
    if file is None or not file.is_file():
        return current
    original = json.loads(file.read_text())
    if current is None:
        return original
    from transformers import GenerationConfig

    if GenerationConfig.from_dict(original).to_diff_dict() == GenerationConfig.from_dict(current).to_diff_dict():
        return original
    return current
