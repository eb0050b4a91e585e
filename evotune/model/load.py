"""Load a causal LM and its tokenizer from whatever a user points at.

``pretrained_model_name_or_path`` may be

* a plain Hugging Face directory (Llama, Qwen2, Mistral, ...): loaded with
  ``AutoModelForCausalLM`` and never with remote code;
* a ``model_type: internlm2`` directory: its remote code breaks on current
  transformers, so it is loaded as transformers' native ``LlamaForCausalLM``
  with an exact weight and config mapping (:mod:`evotune.model.internlm2`);
* an InternEvo checkpoint folder (``model_config.pt`` + ``model_tp{t}_pp{p}.pt``)
  of any tensor/pipeline split (:mod:`evotune.checkpoint.internevo`).

The returned model carries ``model.evotune_source``, a dict
``{"format": "hf" | "internlm2" | "internevo", "path": str, "config": dict}``
(``config``: the original ``config.json``, or for InternEvo the
``model_config.pt`` dict with its dtype written as a string), so that
:func:`evotune.checkpoint.hf.save_hf` can write the model back in the layout it
came in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evotune.errors import EvotuneError

SOURCE_ATTR = "evotune_source"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
)


def resolve_dtype(dtype, default: torch.dtype | None = None) -> torch.dtype | None:
    """A torch dtype from a dtype, a name ('bfloat16', 'torch.float32') or None/'auto' (-> ``default``)."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise EvotuneError(f"unknown dtype {dtype!r}: use one of bfloat16, float16, float32 or auto")
    return _DTYPES[name]


def read_config_json(path: Path) -> dict:
    file = path / "config.json"
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise EvotuneError(f"{file}: not valid JSON ({e}); restore the file from the original model") from e


def detect_format(path) -> str:
    """'internevo', 'internlm2' or 'hf' for a model directory; an EvotuneError for anything else."""
    p = Path(path)
    if not p.exists():
        raise EvotuneError(f"model path {p} does not exist: set pretrained_model_name_or_path to a model directory")
    if not p.is_dir():
        raise EvotuneError(f"model path {p} is a file: point at the folder that holds config.json or model_config.pt")
    if (p / "model_config.pt").is_file():
        return "internevo"
    if (p / "config.json").is_file():
        model_type = read_config_json(p).get("model_type")
        return "internlm2" if model_type == "internlm2" else "hf"
    raise EvotuneError(
        f"{p} holds neither config.json (Hugging Face model) nor model_config.pt (InternEvo checkpoint): "
        "point at a model directory"
    )


def _load_hf(p: Path, dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = read_config_json(p)
    if not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        raise EvotuneError(f"{p} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise EvotuneError(
            f"{p / 'config.json'}: model_type {config_dict.get('model_type')!r} is not known to transformers "
            f"and evotune never runs remote code ({e}); use a model transformers supports or upgrade transformers"
        ) from e
    torch_dtype = resolve_dtype(dtype, default=None)
    model = AutoModelForCausalLM.from_pretrained(
        p,
        config=config,
        dtype=torch_dtype if torch_dtype is not None else "auto",
        trust_remote_code=False,
        device_map=None,
    )
    return model


def load_model(path, dtype=None, device=None) -> torch.nn.Module:
    """Load a causal LM (a transformers ``PreTrainedModel``) from a HF, InternLM2 or InternEvo directory.

    ``dtype``: a torch dtype or a name ('bfloat16', 'float32', 'auto'); None or
    'auto' keeps the checkpoint's dtype (its config's, else its weights').
    ``device``: where the parameters go (default CPU).
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "internlm2":
        from evotune.model.internlm2 import load_internlm2

        model = load_internlm2(p, dtype=resolve_dtype(dtype))
        source = {"format": "internlm2", "path": str(p), "config": read_config_json(p)}
    elif fmt == "internevo":
        from evotune.checkpoint.internevo import load_internevo_model

        model, internevo_config = load_internevo_model(p, dtype=resolve_dtype(dtype))
        source = {"format": "internevo", "path": str(p), "config": internevo_config}
    else:
        model = _load_hf(p, dtype)
        source = {"format": "hf", "path": str(p), "config": read_config_json(p)}
    if fmt != "hf" and (p / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(p)
    if device is not None:
        model = model.to(device)
    model.eval()
    setattr(model, SOURCE_ATTR, source)
    return model


def load_tokenizer(path):
    """A Hugging Face tokenizer for a model directory or a sentencepiece ``.model`` file.

    Returns None when the directory holds no tokenizer files at all (training on
    token-id data needs none). InternLM2 directories (and directories with only
    a sentencepiece ``tokenizer.model``) are read without remote code by
    :class:`evotune.model.internlm2.InternLM2Tokenizer`, which encodes exactly
    as the published InternLM2 tokenizer.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        from evotune.model.internlm2 import InternLM2Tokenizer

        return InternLM2Tokenizer(vocab_file=str(p))
    if not p.is_dir():
        raise EvotuneError(f"tokenizer path {p} is neither a directory nor a sentencepiece .model file")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        return None
    tok_cfg = {}
    if (p / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((p / "tokenizer_config.json").read_text())
    internlm2 = "auto_map" in tok_cfg or str(tok_cfg.get("tokenizer_class", "")).startswith("InternLM2")
    sentencepiece_only = (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file()
    if internlm2 or sentencepiece_only:
        if not (p / "tokenizer.model").is_file():
            raise EvotuneError(f"{p}: an InternLM2 tokenizer needs tokenizer.model; copy it from the original model")
        from evotune.model.internlm2 import InternLM2Tokenizer

        return InternLM2Tokenizer.from_pretrained(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise EvotuneError(f"{p}: cannot build a tokenizer without remote code ({e})") from e
