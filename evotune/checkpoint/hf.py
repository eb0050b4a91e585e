"""Read and write Hugging Face model directories, one tensor at a time.

:class:`LazyWeights` reads ``*.safetensors`` (or ``pytorch_model*.bin``) shards
lazily, so conversions never hold more than the tensors they are working on.
:func:`save_hf` writes a model or a full state dict as a HF directory, in the
layout the model came in (``model.evotune_source``) or in transformers' native
layout, atomically (temporary folder + rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from evotune.errors import EvotuneError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class LazyWeights(Mapping):
    """A read-only ``name -> tensor`` mapping over a HF directory's weight shards.

    safetensors shards are opened once and read per tensor; ``.bin`` shards are
    memory-mapped with ``torch.load(mmap=True, weights_only=True)``.
    """

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        self._where: dict[str, object] = {}
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            index = self.path / INDEX_NAME
            if index.is_file():
                listed = set(json.loads(index.read_text())["weight_map"].values())
                missing = sorted(f for f in listed if not (self.path / f).is_file())
                if missing:
                    raise EvotuneError(f"{index} lists {missing[0]} but that file is missing: copy every shard")
            for f in files:
                handle = safe_open(str(f), framework="pt")
                for key in handle.keys():
                    self._where[key] = handle
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
        return src[key] if isinstance(src, dict) else src.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _shards(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype=None
) -> None:
    """Write ``tensors`` as ``model.safetensors`` or numbered shards + index.

    Values are fetched from the mapping one shard at a time (a lazy mapping
    keeps memory at one shard). ``dtype`` casts floating tensors.
    """
    from safetensors.torch import save_file

    names = list(tensors)
    shape_dtype = {}
    sizes = {}
    for n in names:
        t = tensors[n]
        out_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        shape_dtype[n] = out_dtype
        sizes[n] = t.numel() * out_dtype.itemsize
        del t
    groups = _shards(names, sizes, max_shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = WEIGHTS_NAME if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        chunk = {n: tensors[n].detach().to("cpu", shape_dtype[n]).contiguous() for n in group}
        save_file(chunk, str(out_dir / fname), metadata={"format": "pt"})
        del chunk
        weight_map.update({n: fname for n in group})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _drop_shared(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; a tied head is re-tied by the loader."""
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    return config.to_dict()


def _copy_tokenizer(src: Path, dst: Path, native: bool) -> None:
    if not src.is_dir():
        if src.is_file() and src.suffix == ".model":
            shutil.copy2(src, dst / "tokenizer.model")
        return
    tok_cfg = src / "tokenizer_config.json"
    remote = tok_cfg.is_file() and "auto_map" in json.loads(tok_cfg.read_text())
    if native and remote:
        # the InternLM2 tokenizer class is remote code: write the sentencepiece-backed one instead
        from evotune.model.load import load_tokenizer

        load_tokenizer(src).save_pretrained(dst)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save_hf(
    model_or_state_dict,
    out_dir,
    *,
    config=None,
    source: dict | None = None,
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
    ``source``: where the model came from (default ``model.evotune_source``).
    ``save_format``: None = the layout the model came in (an InternLM2 or
    InternEvo model is written as InternLM2: same keys, same config fields,
    ``auto_map`` kept, remote-code ``.py`` files copied), 'internlm2', or
    'huggingface' (transformers' native layout).
    ``tokenizer_path``: tokenizer files to copy (default: the source directory).
    ``dtype``: cast floating tensors (default: as they are).
    Refuses a non-empty ``out_dir`` unless ``overwrite=True``.
    """
    from evotune.model.load import SOURCE_ATTR, resolve_dtype

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise EvotuneError(f"{out} exists and is not empty: choose a new directory or pass overwrite=True")
    is_model = isinstance(model_or_state_dict, torch.nn.Module)
    model = model_or_state_dict if is_model else None
    if source is None and model is not None:
        source = getattr(model, SOURCE_ATTR, None)
    source = source or {}
    if config is None and model is not None:
        config = model.config
    if config is None:
        raise EvotuneError("save_hf: a state dict needs config= (the model's PretrainedConfig or config dict)")
    fmt = save_format or ("internlm2" if source.get("format") in ("internlm2", "internevo") else "huggingface")
    if fmt not in ("internlm2", "huggingface"):
        raise EvotuneError(f"unknown save format {save_format!r}: use internlm2 or huggingface")
    out_dtype = resolve_dtype(dtype)
    state = model.state_dict() if is_model else dict(model_or_state_dict)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    cfg = _config_dict(config)
    if out_dtype is None:
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        out_dtype_name = _dtype_name(floats[0]) if floats else None
    else:
        out_dtype_name = _dtype_name(out_dtype)

    source_dir = Path(source["path"]) if source.get("path") else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if fmt == "internlm2":
            from evotune.model.internlm2 import internlm2_config_from_llama, llama_to_internlm2

            llama_config = _llama_config(config)
            base = source.get("config") if source.get("format") == "internlm2" else None
            cfg_out = internlm2_config_from_llama(llama_config, base)
            if out_dtype_name:
                cfg_out["torch_dtype"] = out_dtype_name
            tensors = dict(
                llama_to_internlm2(
                    _drop_shared(state, llama_config.tie_word_embeddings),
                    llama_config.num_attention_heads,
                    llama_config.num_key_value_heads,
                )
            )
            write_safetensors(tensors, tmp, max_shard_bytes, out_dtype)
            del tensors
            if source_dir is not None and source.get("format") == "internlm2":
                for py in sorted(source_dir.glob("*.py")):  # the remote code, if the source had it
                    shutil.copy2(py, tmp / py.name)
        else:
            cfg_out = dict(cfg)
            if out_dtype_name:
                cfg_out["dtype"] = out_dtype_name
                cfg_out.pop("torch_dtype", None)
            write_safetensors(
                _drop_shared(state, bool(cfg_out.get("tie_word_embeddings"))), tmp, max_shard_bytes, out_dtype
            )
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2, sort_keys=True) + "\n")
        _write_generation_config(model, source_dir, tmp)
        tok_src = Path(tokenizer_path) if tokenizer_path is not None else source_dir
        if tok_src is not None:
            _copy_tokenizer(tok_src, tmp, native=(fmt == "huggingface"))
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _llama_config(config):
    from transformers import LlamaConfig

    if isinstance(config, dict):
        if config.get("model_type") == "internlm2":
            from evotune.model.internlm2 import llama_config_from_internlm2

            return llama_config_from_internlm2(config)
        return LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    if config.model_type != "llama":
        raise EvotuneError(
            f"a {config.model_type} model cannot be written in the InternLM2 layout: use --save-format huggingface"
        )
    return config


def _write_generation_config(model, source_dir: Path | None, out: Path) -> None:
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        shutil.copy2(source_dir / "generation_config.json", out / "generation_config.json")
        return
    gen = getattr(model, "generation_config", None) if model is not None else None
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except ValueError:  # an invalid generation config is not worth failing an export for
            pass
