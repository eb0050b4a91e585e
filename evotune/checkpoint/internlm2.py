"""InternLM2's Hugging Face layout <-> transformers Llama: the exact weight and config mapping.

InternLM2 is a Llama with different names and a fused, grouped ``wqkv``. Its
Hugging Face release needs remote code that no longer runs on transformers 5,
so evotune reads it as the native Llama layout and writes it back in the
InternLM2 layout (docs/models.md, "InternLM2 without remote code"). The
mapping is pure reindexing (no arithmetic) on plans (:mod:`evotune.checkpoint.hf`),
so both directions are bitwise exact and no tensor is read before it is written:

* ``wqkv`` rows ``[(nh + 2 nkv) d, H]`` are grouped per key/value head as
  ``[nkv, g + 2, d, H]`` (``g = nh / nkv``): the group's ``g`` query heads, one
  key head, one value head. Query head ``j`` uses kv head ``j // g``, which is
  what Llama's ``repeat_kv`` does.
* ``w1`` -> gate, ``w3`` -> up, ``w2`` -> down (the model computes
  ``w2(silu(w1 x) * w3 x)``); ``attention_norm``/``ffn_norm`` -> input/post
  attention layernorm; ``tok_embeddings`` -> ``embed_tokens``; ``output`` ->
  ``lm_head``.
* ``bias: true`` puts biases on ``wqkv`` and ``wo`` only, as Llama's
  ``attention_bias`` does on q/k/v/o.
* RoPE is rotate-half with ``rope_theta``; ``rope_scaling`` of type ``dynamic``
  (InternLM2's dynamic NTK) or ``linear`` maps onto Llama's rope parameters of
  the same name (both use ``max_position_embeddings`` as the original length).
"""

from __future__ import annotations

import re

import torch

from evotune.checkpoint.plan import Planned
from evotune.errors import EvotuneError

# per-layer suffixes that are a rename only (InternLM2 -> Llama)
_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# the remote-code auto_map of the published InternLM2 checkpoints
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def _required(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise EvotuneError(f"{where}: key {key!r} is missing; an InternLM2 config.json must set it")
    return cfg[key]


def llama_config_from_internlm2(cfg: dict, where: str = "config.json"):
    """A ``LlamaConfig`` that computes exactly what the InternLM2 remote code computes."""
    from transformers import LlamaConfig

    hidden = _required(cfg, "hidden_size", where)
    heads = _required(cfg, "num_attention_heads", where)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads:
        raise EvotuneError(
            f"{where}: hidden_size {hidden}, num_attention_heads {heads}, num_key_value_heads {kv_heads} "
            "do not divide evenly; fix the config"
        )
    theta = cfg.get("rope_theta", 10000)
    rope = {"rope_type": "default", "rope_theta": float(theta)}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise EvotuneError(
                f"{where}: rope_scaling type {kind!r} is not an InternLM2 rope (dynamic or linear); fix rope_scaling"
            )
        rope = {"rope_type": kind, "rope_theta": float(theta), "factor": float(_required(scaling, "factor", where))}
    if cfg.get("hidden_act", "silu") != "silu":
        raise EvotuneError(f"{where}: hidden_act {cfg['hidden_act']!r}: InternLM2 uses silu; fix the config")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return LlamaConfig(
        vocab_size=_required(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_required(cfg, "intermediate_size", where),
        num_hidden_layers=_required(cfg, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act="silu",
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        initializer_range=cfg.get("initializer_range", 0.02),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        use_cache=cfg.get("use_cache", True),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        rope_parameters=rope,
        attention_bias=bool(cfg.get("bias", False)),
        mlp_bias=False,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def internlm2_config_from_llama(config, base: dict | None = None) -> dict:
    """An InternLM2 ``config.json`` dict for a Llama-shaped config.

    ``base`` (the original InternLM2 config) keeps every field the mapping does
    not own (``auto_map``, ``attn_implementation``, custom keys), so an exported
    model reads exactly as it came in.
    """
    out = dict(base) if base else {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": dict(INTERNLM2_AUTO_MAP),
        "model_type": "internlm2",
        "hidden_act": "silu",
    }
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "dynamic", "linear"):
        raise EvotuneError(f"rope type {kind!r} has no InternLM2 equivalent: export with --save-format huggingface")
    if config.mlp_bias:
        raise EvotuneError("InternLM2 has no MLP biases: export this model with --save-format huggingface")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise EvotuneError("InternLM2 needs head_dim * heads == hidden_size: export with --save-format huggingface")
    updates = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=_plain_number(rope.get("rope_theta", out.get("rope_theta", 10000))),
        rope_scaling=None if kind == "default" else {"type": kind, "factor": _plain_number(rope["factor"])},
        bias=bool(config.attention_bias),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    for key, value in updates.items():
        if not (key in out and out[key] == value):  # equal values keep their original spelling (1e6 vs 1000000)
            out[key] = value
    return out


def _plain_number(x):
    """1000000.0 -> 1000000, so a round trip keeps config.json's integers as integers."""
    x = float(x)
    return int(x) if x.is_integer() else x


def _wqkv_head_dim(rows: int, heads: int, kv_heads: int, name: str = "wqkv") -> int:
    """Head dim of a grouped ``wqkv`` with ``rows`` rows: ``rows / (kv_heads * (heads / kv_heads + 2))``."""
    group_rows = kv_heads * (heads // kv_heads + 2)
    if rows % group_rows:
        raise EvotuneError(
            f"{name} has {rows} rows, not a multiple of num_key_value_heads*(q_per_kv+2) = {group_rows}: "
            "the config's head counts do not match the weights"
        )
    return rows // group_rows


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped ``wqkv`` (weight ``[rows, H]`` or bias ``[rows]``) -> q, k, v in Llama head order."""
    g = heads // kv_heads
    d = _wqkv_head_dim(w.shape[0], heads, kv_heads)
    grouped = w.reshape(kv_heads, g + 2, d, *w.shape[1:])
    q = grouped[:, :g].reshape(heads * d, *w.shape[1:])
    k = grouped[:, g].reshape(kv_heads * d, *w.shape[1:])
    v = grouped[:, g + 1].reshape(kv_heads * d, *w.shape[1:])
    return q, k, v


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`."""
    g = heads // kv_heads
    d = q.shape[0] // heads
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(kv_heads, g, d, *rest), k.reshape(kv_heads, 1, d, *rest), v.reshape(kv_heads, 1, d, *rest)], dim=1
    )
    return grouped.reshape(kv_heads * (g + 2) * d, *rest)


def _wqkv_parts(load, heads: int, kv_heads: int):
    """Three loaders (q, k, v) sharing one read of ``wqkv``: the tensor is split once, handed out, forgotten."""
    held: dict[str, torch.Tensor] = {}

    def part(name: str):
        def get():
            if name not in held:
                held.clear()
                held.update(zip("qkv", split_wqkv(load(), heads, kv_heads)))
            return held.pop(name)

        return get

    return part("q"), part("k"), part("v")


def plan_internlm2_to_llama(plan: dict[str, Planned], heads: int, kv_heads: int) -> dict[str, Planned]:
    """InternLM2 names -> Llama names (wqkv becomes q/k/v), without reading any tensor."""
    out: dict[str, Planned] = {}
    for key, p in plan.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = p
            continue
        if key.endswith(".rotary_emb.inv_freq"):  # a buffer some old saves include; recomputed from the config
            continue
        m = _LAYER_RE.match(key)
        if m is None:
            raise EvotuneError(f"unexpected InternLM2 weight {key!r}: not part of the InternLM2 layout")
        i, rest = m.groups()
        prefix = f"model.layers.{i}."
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            d = _wqkv_head_dim(p.shape[0], heads, kv_heads, key)
            loads = _wqkv_parts(p.load, heads, kv_heads)
            for name, n_heads, load in zip("qkv", (heads, kv_heads, kv_heads), loads):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = Planned((n_heads * d, *p.shape[1:]), p.dtype, load)
        elif rest in _LAYER_RENAMES:
            out[prefix + _LAYER_RENAMES[rest]] = p
        else:
            raise EvotuneError(f"unexpected InternLM2 weight {key!r}: not part of the InternLM2 layout")
    return out


_LLAMA_TO_INTERNLM2_TOP = {v: k for k, v in _TOP_RENAMES.items()}
_LLAMA_TO_INTERNLM2_LAYER = {v: k for k, v in _LAYER_RENAMES.items()}


def plan_llama_to_internlm2(plan: dict[str, Planned], heads: int, kv_heads: int) -> dict[str, Planned]:
    """Llama names -> InternLM2 names (q/k/v merged into the grouped wqkv), without reading any tensor."""
    out: dict[str, Planned] = {}
    for key, p in plan.items():
        if key in _LLAMA_TO_INTERNLM2_TOP:
            out[_LLAMA_TO_INTERNLM2_TOP[key]] = p
            continue
        m = _LAYER_RE.match(key)
        if m is None:
            raise EvotuneError(f"weight {key!r} has no InternLM2 name: export with --save-format huggingface")
        i, rest = m.groups()
        prefix = f"model.layers.{i}."
        if rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            kind = rest.rsplit(".", 1)[1]
            names = [f"{prefix}self_attn.{n}_proj.{kind}" for n in "qkv"]
            missing = [n for n in names if n not in plan]
            if missing:
                raise EvotuneError(f"{missing[0]} is missing: q, k and v projections come together")
            q, k, v = (plan[n] for n in names)
            shape = (q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:])

            def load(q=q, k=k, v=v):
                return merge_wqkv(q.load(), k.load(), v.load(), heads, kv_heads)

            out[f"{prefix}attention.wqkv.{kind}"] = Planned(shape, q.dtype, load)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue  # merged with q_proj
        elif rest in _LLAMA_TO_INTERNLM2_LAYER:
            out[prefix + _LLAMA_TO_INTERNLM2_LAYER[rest]] = p
        else:
            raise EvotuneError(f"weight {key!r} has no InternLM2 name: export with --save-format huggingface")
    return out


def llama_config_of(config):
    """The ``LlamaConfig`` behind a config object or dict (InternLM2 dicts are mapped)."""
    from transformers import LlamaConfig

    if isinstance(config, dict):
        if config.get("model_type") == "internlm2":
            return llama_config_from_internlm2(config)
        if config.get("model_type") not in (None, "llama"):
            raise EvotuneError(
                f"a {config.get('model_type')} model cannot be written in the InternLM2 layout: "
                "use --save-format huggingface"
            )
        return LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    if config.model_type != "llama":
        raise EvotuneError(
            f"a {config.model_type} model cannot be written in the InternLM2 layout: use --save-format huggingface"
        )
    return config
