"""LoRA and QLoRA on a loaded causal LM, with peft and bitsandbytes (docs/lora.md).

:func:`apply_lora` injects peft's LoRA layers into the model in place
(``peft.inject_adapter_in_model``: the module tree and parameter names stay
transformers' own plus ``lora_A/B.default``, so FSDP, activation checkpointing,
compilation and DCP see the same model as in a full fine-tune) and freezes
everything else. Without ``target_modules`` every linear layer of the decoder
is adapted, lm_head excepted (XTuner's default); the chosen names are printed,
with the trainable and frozen parameters and their bytes.

:func:`quantize` is QLoRA's loading step: the decoder's linear layers become
bitsandbytes ``Linear4bit`` (NF4 or FP4, double quantisation, compute dtype and
quant storage as ``transformers.BitsAndBytesConfig`` says), quantised when
moved to their device. evotune loads InternLM2 and InternEvo checkpoints with
its own code (evotune/model/internlm2.py), not through
``from_pretrained(quantization_config=...)``, so the layers are replaced here,
the way transformers does it (lm_head and ``llm_int8_skip_modules`` stay).

:func:`adapter_modules` gives the trained adapter as ``{module path: (A, B)}``
in transformers' names and :func:`adapter_config` its PEFT config;
evotune/checkpoint/adapter.py writes both in the base's layout.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Mapping

import torch
from torch import nn

from evotune.checkpoint.adapter import INTERNLM2_MODULES, QKV
from evotune.checkpoint.source import ModelSource
from evotune.config import build
from evotune.errors import EvotuneError
from evotune.model.layers import decoder_layers

ADAPTER_NAME = "default"
# LoraConfig fields whose non-default values the export or the merge cannot carry
_REFUSED = {"bias": ("none", "evotune exports LoRA matrices only; train biases with a full fine-tune"),
            "modules_to_save": (None, "evotune exports LoRA matrices only"),
            "use_dora": (False, "DoRA's magnitude vectors have no InternLM2 mapping or merge here"),
            "fan_in_fan_out": (False, "only for GPT-2 style Conv1D layers, which evotune's models have none of"),
            "lora_bias": (False, "evotune exports LoRA matrices only")}
QLORA_INSTALL = "pip install 'evotune[qlora]' (or: pip install bitsandbytes)"


def lora_config(spec):
    """A ``peft.LoraConfig`` from a config's ``lora=dict(type=LoraConfig, ...)``, a plain dict or a LoraConfig."""
    from peft import LoraConfig

    if isinstance(spec, Mapping) and "type" not in spec:
        spec = LoraConfig(**spec)
    config = build(dict(spec)) if isinstance(spec, Mapping) else spec
    if not isinstance(config, LoraConfig):
        raise EvotuneError(f"lora={spec!r}: use dict(type=LoraConfig, r=..., lora_alpha=..., ...) (peft's LoraConfig)")
    for key, (default, why) in _REFUSED.items():
        if getattr(config, key) not in (default, "none") or (key == "modules_to_save" and config.modules_to_save):
            raise EvotuneError(f"lora {key}={getattr(config, key)!r}: not supported ({why}); remove it")
    return config


def linear_layer_names(llm: nn.Module) -> dict[str, list[str]]:
    """The decoder's linear layers: ``{last name: [module paths]}`` (lm_head is outside the decoder)."""
    inside = {id(m) for layer in decoder_layers(llm, "LoRA targets their linear layers") for m in layer.modules()}
    names: dict[str, list[str]] = {}
    for path, module in llm.named_modules():
        if id(module) in inside and _is_linear(module):
            names.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return names


def is_4bit(p: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight (packed codes plus a quantisation state, frozen): FSDP2 leaves it
    unsharded and nothing casts it (evotune/parallel/fsdp.py)."""
    return type(p).__name__ == "Params4bit"


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


# InternLM2's linear names -> the Llama layers evotune loads them as (wqkv is split into q, k, v)
INTERNLM2_TARGETS = {internlm2.rsplit(".", 1)[-1]: (llama.rsplit(".", 1)[-1],)
                     for llama, internlm2 in INTERNLM2_MODULES.items()}
INTERNLM2_TARGETS["wqkv"] = tuple(name.rsplit(".", 1)[-1] for name in QKV)


def _from_internlm2_names(targets: list[str], linears, log) -> list[str]:
    """``target_modules`` of an InternLM2 base may name its own modules (``wqkv``, ``wo``, ``w1``, ``w2``,
    ``w3``; XTuner loads InternLM2's own code, where these are the names): they become the Llama layers
    evotune trains, and the adapter is written back in InternLM2 names (docs/lora.md, "InternLM2")."""
    out, said = [], []
    for name in targets:
        if name in INTERNLM2_TARGETS and name not in linears:
            out += [n for n in INTERNLM2_TARGETS[name] if n not in out]
            said.append(f"{name} -> {', '.join(INTERNLM2_TARGETS[name])}")
        elif name not in out:
            out.append(name)
    if said and log:
        log(f"evotune: LoRA target_modules in InternLM2 names: {'; '.join(said)}")
    return out


def apply_lora(llm: nn.Module, spec, log=print):
    """Inject LoRA into ``llm`` in place and freeze the rest; returns the ``LoraConfig`` used
    (``target_modules`` resolved to the linear names adapted)."""
    from peft import inject_adapter_in_model

    config = lora_config(spec)
    linears = linear_layer_names(llm)
    listed = ", ".join(sorted(linears))
    source = ModelSource.of(llm)
    internlm2 = source is not None and source.format in ("internlm2", "internevo")
    # XTuner's adapter on InternLM2's fused wqkv (docs/lora.md, "InternLM2"): all linear layers, or wqkv named
    fused_wqkv = internlm2 and not config.rank_pattern and not config.alpha_pattern and (
        config.target_modules in (None, "all-linear")
        or (not isinstance(config.target_modules, str) and "wqkv" in config.target_modules))
    if config.target_modules is None:
        config.target_modules = sorted(linears)
        how = "all linear layers of the decoder (no target_modules given)"
    elif isinstance(config.target_modules, str):  # a regex over module paths, as peft reads it
        how = f"target_modules regex {config.target_modules!r}"
    else:
        if internlm2:
            config.target_modules = set(_from_internlm2_names(sorted(config.target_modules), linears, log))
            listed += f" (in InternLM2 names: {', '.join(sorted(INTERNLM2_TARGETS))})"
        unknown = sorted(set(config.target_modules) - set(linears))
        if unknown:
            raise EvotuneError(f"lora target_modules {unknown} match no linear layer of the model; its linear "
                               f"layers are: {listed}")
        how = "target_modules"
    if config.target_modules == "all-linear":
        config.target_modules = sorted(linears)
    for p in llm.parameters():
        p.requires_grad_(False)
    try:
        inject_adapter_in_model(config, llm, adapter_name=ADAPTER_NAME)
    except ValueError as e:  # a regex matching nothing
        raise EvotuneError(f"lora target_modules {config.target_modules!r}: {e}; the model's linear layers are: "
                           f"{listed}") from e
    adapted = sorted({path.rsplit(".", 1)[-1] for path, m in llm.named_modules() if hasattr(m, "lora_A")})
    shared = _share_qkv_a(llm) if fused_wqkv else 0
    llm.enable_input_require_grads()  # peft's rule for checkpointed layers whose inputs are all frozen
    if log:
        log(f"evotune: LoRA r={config.r} alpha={config.lora_alpha} dropout={config.lora_dropout} on {how}: "
            f"{', '.join(adapted)}")
        if shared:
            log(f"evotune: LoRA on InternLM2's wqkv: q_proj, k_proj and v_proj share one lora_A in each of "
                f"{shared} layers, one rank-{config.r} adapter on wqkv as XTuner trains it")
        log("evotune: " + parameter_summary(llm))
    return config


def _share_qkv_a(llm: nn.Module) -> int:
    """Make q_proj's ``lora_A`` module also k_proj's and v_proj's, in every decoder layer adapting all three;
    returns how many. InternLM2 computes q, k and v with one fused ``wqkv`` layer, and a LoRA adapter on it
    (XTuner's) is ``wqkv + B @ A(x)`` with one ``A`` [r, hidden] and one ``B`` [rows of wqkv, r]: split into
    evotune's Llama layers, that is one shared ``A`` and ``B``'s rows for q, k and v. The same module in
    three places is one parameter to autograd (its gradient sums the three uses), the optimizer, FSDP2 and
    DCP (which stores it under each name, loading the same values). peft draws each layer's dropout mask
    separately, so with ``lora_dropout > 0`` q, k and v see three masks where the fused layer draws one."""
    shared = 0
    for layer in decoder_layers(llm, "LoRA shares wqkv's A across q, k and v"):
        projections = [layer.get_submodule(name) for name in QKV]
        if not all(hasattr(p, "lora_A") and ADAPTER_NAME in p.lora_A for p in projections):
            continue
        for p in projections[1:]:
            p.lora_A[ADAPTER_NAME] = projections[0].lora_A[ADAPTER_NAME]
        shared += 1
    return shared


def shares_qkv_a(llm: nn.Module) -> bool:
    """Whether q, k and v share one ``lora_A`` (:func:`_share_qkv_a`): recorded in checkpoints, since a
    checkpoint of independent ones cannot resume into shared ones."""
    for layer in decoder_layers(llm, "LoRA shares wqkv's A across q, k and v"):
        try:
            q, k = (layer.get_submodule(name) for name in QKV[:2])
        except AttributeError:  # not a Llama-style attention
            return False
        if all(hasattr(p, "lora_A") and ADAPTER_NAME in p.lora_A for p in (q, k)):
            return q.lora_A[ADAPTER_NAME] is k.lora_A[ADAPTER_NAME]
    return False


def parameter_summary(module: nn.Module) -> str:
    """Trainable and frozen parameters and bytes (a 4-bit weight counts its stored bytes)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    n_t, n_f = sum(p.numel() for p in trainable), sum(_logical_numel(p) for p in frozen)
    b_t, b_f = sum(p.nbytes for p in trainable), sum(p.nbytes for p in frozen)
    share = 100 * n_t / max(n_t + n_f, 1)
    return (f"trainable parameters {n_t:,} ({share:.3f}%, {b_t / 2**20:.1f} MiB), frozen {n_f:,} "
            f"({b_f / 2**20:.1f} MiB)")


def _logical_numel(p: torch.Tensor) -> int:
    """A bitsandbytes 4-bit weight stores two values a byte: count the weight's own shape."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def is_lora(llm: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for m in llm.modules())


def adapter_modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` from a (full or trainable-only) state dict in transformers' names."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        for half in ("A", "B"):
            tail = f".lora_{half}.{ADAPTER_NAME}.weight"
            if key.endswith(tail):
                out.setdefault(key[: -len(tail)], {})[half] = t
    return {path: (h["A"], h["B"]) for path, h in out.items()}


def _plain(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def adapter_config(config, base_model_name_or_path: str | None) -> dict:
    """The ``adapter_config.json`` dict PEFT writes for ``config`` (a LoraConfig), inference mode on."""
    out = {k: _plain(v) for k, v in config.to_dict().items()}
    out.update(base_model_name_or_path=base_model_name_or_path, inference_mode=True, peft_type="LORA")
    return out


# --------------------------------------------------------------------------- QLoRA


def quantization_config(spec):
    """A ``transformers.BitsAndBytesConfig`` from its ``type=`` dict, a plain dict or itself."""
    from transformers import BitsAndBytesConfig

    if isinstance(spec, Mapping):
        spec = build(dict(spec)) if "type" in spec else BitsAndBytesConfig(**spec)
    if not isinstance(spec, BitsAndBytesConfig):
        raise EvotuneError(f"quantization_config={spec!r}: use dict(type=BitsAndBytesConfig, load_in_4bit=True, ...)")
    return spec


def quantize(llm: nn.Module, spec, device=None) -> int:
    """Replace the decoder's ``nn.Linear`` layers with bitsandbytes 4-bit ones (QLoRA); returns how many.

    The weights are quantised when the layer reaches ``device`` (default: the
    weight's own device, the CPU after loading), as bitsandbytes does on ``.to()``.
    """
    config = quantization_config(spec)
    if config.load_in_8bit or not config.load_in_4bit:
        raise EvotuneError("quantization_config: evotune trains QLoRA with load_in_4bit=True only "
                           "(load_in_8bit is not supported); set load_in_4bit=True, load_in_8bit=False")
    if config.llm_int8_enable_fp32_cpu_offload:
        raise EvotuneError("quantization_config llm_int8_enable_fp32_cpu_offload=True: not supported; remove it")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EvotuneError(f"quantization_config load_in_4bit=True needs bitsandbytes: {QLORA_INSTALL}")
    import bitsandbytes as bnb

    skip = set(config.llm_int8_skip_modules or ())
    replaced = 0
    for path, paths in linear_layer_names(llm).items():
        if path in skip:
            continue
        for full in paths:
            parent_path, _, name = full.rpartition(".")
            parent = llm.get_submodule(parent_path)
            old = getattr(parent, name)
            if not isinstance(old, nn.Linear):
                continue
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=config.bnb_4bit_compute_dtype,
                                    compress_statistics=config.bnb_4bit_use_double_quant,
                                    quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
                                    device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False,
                                           compress_statistics=config.bnb_4bit_use_double_quant,
                                           quant_type=config.bnb_4bit_quant_type,
                                           quant_storage=config.bnb_4bit_quant_storage, module=new)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data, requires_grad=False)
            # On an AVX512-BF16 CPU, bitsandbytes repacks the weight in place at the first eval-mode forward
            # without grad (samples, validation) into an inference layout whose matmul passes no gradient to
            # its input and rounds absmax to bf16; training after it would be silently wrong (and layers
            # narrower than 64 fail). Keep the one layout training uses.
            new.support_avx512bf16_for_cpu = False
            new.to(device if device is not None else old.weight.device)
            setattr(parent, name, new)
            replaced += 1
    llm.is_loaded_in_4bit = True  # what peft checks to pick its 4-bit LoRA layer
    return replaced
