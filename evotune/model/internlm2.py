"""InternLM2 <-> transformers Llama: the exact weight and config mapping.

InternLM2 is a Llama with different names and a fused, grouped ``wqkv``. Its
Hugging Face release needs remote code that no longer runs on transformers 5,
so evotune loads it as the native ``LlamaForCausalLM`` and writes it back in
the InternLM2 layout. The mapping is pure reindexing (no arithmetic), so both
directions are bitwise exact:

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
from collections.abc import Iterable, Iterator

import torch

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
    out.update(
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
    return out


def _plain_number(x):
    """1000000.0 -> 1000000, so a round trip keeps config.json's integers as integers."""
    x = float(x)
    return int(x) if x.is_integer() else x


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped ``wqkv`` (weight ``[rows, H]`` or bias ``[rows]``) -> q, k, v in Llama head order."""
    g = heads // kv_heads
    rows = w.shape[0]
    d = rows // (kv_heads * (g + 2))
    if d * kv_heads * (g + 2) != rows:
        raise EvotuneError(
            f"wqkv has {rows} rows, not a multiple of num_key_value_heads*(q_per_kv+2) = {kv_heads * (g + 2)}: "
            "the config's head counts do not match the weights"
        )
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


def internlm2_to_llama(
    items: Iterable[tuple[str, torch.Tensor]], heads: int, kv_heads: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename/split InternLM2 tensors into Llama tensors, one input tensor at a time (lazy-friendly)."""
    for key, tensor in items:
        if key in _TOP_RENAMES:
            yield _TOP_RENAMES[key], tensor
            continue
        m = _LAYER_RE.match(key)
        if m is None:
            raise EvotuneError(f"unexpected InternLM2 weight {key!r}: not part of the InternLM2 layout")
        i, rest = m.groups()
        prefix = f"model.layers.{i}."
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for name, t in zip(("q", "k", "v"), split_wqkv(tensor, heads, kv_heads)):
                yield f"{prefix}self_attn.{name}_proj.{kind}", t
        elif rest in _LAYER_RENAMES:
            yield prefix + _LAYER_RENAMES[rest], tensor
        else:
            raise EvotuneError(f"unexpected InternLM2 weight {key!r}: not part of the InternLM2 layout")


_LLAMA_TO_INTERNLM2_TOP = {v: k for k, v in _TOP_RENAMES.items()}
_LLAMA_TO_INTERNLM2_LAYER = {v: k for k, v in _LAYER_RENAMES.items()}
_LLAMA_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def llama_to_internlm2(
    state_dict, heads: int, kv_heads: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama tensors (a mapping) -> InternLM2 tensors, in InternLM2 key order per layer."""
    for key in state_dict:
        if key in _LLAMA_TO_INTERNLM2_TOP:
            yield _LLAMA_TO_INTERNLM2_TOP[key], state_dict[key]
            continue
        m = _LLAMA_LAYER_RE.match(key)
        if m is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise EvotuneError(f"weight {key!r} has no InternLM2 name: export with --save-format huggingface")
        i, rest = m.groups()
        prefix = f"model.layers.{i}."
        if rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            kind = rest.rsplit(".", 1)[1]
            q = state_dict[key]
            k = state_dict[f"{prefix}self_attn.k_proj.{kind}"]
            v = state_dict[f"{prefix}self_attn.v_proj.{kind}"]
            yield f"{prefix}attention.wqkv.{kind}", merge_wqkv(q, k, v, heads, kv_heads)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue  # merged with q_proj
        elif rest in _LLAMA_TO_INTERNLM2_LAYER:
            yield prefix + _LLAMA_TO_INTERNLM2_LAYER[rest], state_dict[key]
        else:
            raise EvotuneError(f"weight {key!r} has no InternLM2 name: export with --save-format huggingface")


def build_llama(config, state: dict[str, torch.Tensor], dtype: torch.dtype | None, where: str):
    """A ``LlamaForCausalLM`` holding exactly ``state`` (no random init, no copy of the weights).

    The model is built on the meta device and the tensors are assigned, so
    loading a 7B model costs one copy of the weights, not two.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if dtype is None:
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    state = {k: (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for k, t in state.items()}
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EvotuneError(
            f"{where}: the weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]}); "
            "check num_hidden_layers/bias/tie_word_embeddings in the config"
        )
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise EvotuneError(
                f"{where}: weight {key} has shape {tuple(t.shape)} but the config implies "
                f"{tuple(expected[key].shape)}; the config does not describe these weights"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # non-persistent buffers were on meta
    if config.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise EvotuneError(f"{where}: no weights for {left[:4]}")
    return model


def load_internlm2(path, dtype: torch.dtype | None = None):
    """Load a ``model_type: internlm2`` directory as a native ``LlamaForCausalLM`` (no remote code)."""
    from evotune.checkpoint.hf import LazyWeights
    from evotune.model.load import read_config_json

    cfg = read_config_json(path)
    config = llama_config_from_internlm2(cfg, where=f"{path}/config.json")
    weights = LazyWeights(path)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = dict(internlm2_to_llama(weights.items(), heads, kv_heads))
    return build_llama(config, state, dtype, where=str(path))
