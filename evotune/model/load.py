"""Load a causal LM and its tokenizer from whatever a user points at.

``pretrained_model_name_or_path`` may be

* a plain Hugging Face directory (Llama, Qwen2, Mistral, ...): loaded with
  ``AutoModelForCausalLM`` and never with remote code;
* a ``model_type: internlm2`` directory: its remote code breaks on current
  transformers, so it is loaded as transformers' native ``LlamaForCausalLM``
  with an exact weight and config mapping (:mod:`evotune.model.internlm2`);
* an InternEvo checkpoint folder (``model_config.pt`` + ``model_tp{t}_pp{p}.pt``)
  of any tensor/pipeline split (:mod:`evotune.checkpoint.internevo`);
* a Hugging Face hub id (``org/name``) of any of these: its snapshot in the
  Hugging Face cache, downloaded when online (:mod:`evotune.model.hub`).

The returned model carries a :class:`~evotune.checkpoint.source.ModelSource`
(``model.evotune_source``: format, path, original config), so that
:func:`evotune.checkpoint.hf.save_hf` can write the model back in the layout it
came in (docs/models.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from evotune.checkpoint.hf import TOKENIZER_FILES
from evotune.checkpoint.source import ModelSource, detect_format, read_config_json
from evotune.dtypes import parse_dtype
from evotune.errors import EvotuneError
from evotune.model.hub import resolve
from evotune.model.lora import quantize
from evotune.model.internlm2 import InternLM2Tokenizer, load_internevo, load_internlm2


def _load_hf(p: Path, dtype: torch.dtype | None) -> torch.nn.Module:
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
    model = AutoModelForCausalLM.from_pretrained(
        p,
        config=config,
        dtype=dtype if dtype is not None else "auto",
        trust_remote_code=False,
        device_map=None,
    )
    return model


def load_model(path, dtype=None, device=None, quantization_config=None) -> torch.nn.Module:
    """Load a causal LM (a transformers ``PreTrainedModel``) from a HF, InternLM2 or InternEvo directory.

    ``dtype``: a torch dtype or a name ('bfloat16', 'float32', 'auto'); None or
    'auto' keeps the checkpoint's dtype (its config's, else its weights').
    ``device``: where the parameters go (default CPU).
    ``quantization_config``: a ``BitsAndBytesConfig`` (or its ``type=`` dict) with ``load_in_4bit``:
    the decoder's linear layers become 4-bit for QLoRA (:func:`evotune.model.lora.quantize`).
    """
    p = Path(resolve(path))
    fmt = detect_format(p)
    torch_dtype = parse_dtype(dtype)
    if fmt == "internevo":
        model, config = load_internevo(p, dtype=torch_dtype)
    else:
        model = (load_internlm2 if fmt == "internlm2" else _load_hf)(p, torch_dtype)
        config = read_config_json(p)
    if fmt != "hf" and (p / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(p)
    if quantization_config is not None:
        quantize(model, quantization_config)
    if device is not None:
        model = model.to(device)
    model.eval()
    ModelSource(fmt, str(p), config).attach(model)
    return model


def load_tokenizer(path):
    """A Hugging Face tokenizer for a model directory or a sentencepiece ``.model`` file.

    Returns None when the directory holds no tokenizer files at all (training on
    token-id data needs none). InternLM2 directories (and directories with only
    a sentencepiece ``tokenizer.model``) are read without remote code by
    :class:`evotune.model.internlm2.InternLM2Tokenizer`, which encodes exactly
    as the published InternLM2 tokenizer.
    """
    p = Path(resolve(path, tokenizer_only=True))
    if p.is_file() and p.suffix == ".model":
        return InternLM2Tokenizer(vocab_file=str(p))
    if not p.is_dir():
        raise EvotuneError(f"tokenizer path {p} is neither a directory nor a sentencepiece .model file")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        return None
    tok_cfg = {}
    if (p / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((p / "tokenizer_config.json").read_text())
    internlm2 = "auto_map" in tok_cfg or str(tok_cfg.get("tokenizer_class", "")).startswith("InternLM2")
    sentencepiece_only = (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file()
    if internlm2 or sentencepiece_only:
        if not (p / "tokenizer.model").is_file():
            raise EvotuneError(f"{p}: an InternLM2 tokenizer needs tokenizer.model; copy it from the original model")
        return InternLM2Tokenizer.from_pretrained(p)
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise EvotuneError(f"{p}: cannot build a tokenizer without remote code ({e})") from e
