"""InternLM2 directories load as native Llama (no remote code) and export back unchanged."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evotune.checkpoint.hf import save_hf
from evotune.errors import EvotuneError
from evotune.model.load import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CONF = SHARED / "conformance" / "internlm2"
TINY = CONF / "tiny_internlm2"
needs_shared = pytest.mark.skipif(not TINY.is_dir(), reason="../shared conformance data not present")


def _golden():
    return np.load(CONF / "golden_logits.npz")


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(torch.from_numpy(ids), **kw).logits.numpy()


def _shift_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    lg = torch.from_numpy(logits[:, :-1]).reshape(-1, logits.shape[-1])
    return float(torch.nn.functional.cross_entropy(lg, torch.from_numpy(ids[:, 1:]).reshape(-1)))


@needs_shared
def test_logits_match_upstream_remote_code():
    g = _golden()
    model = load_model(TINY)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.evotune_source.format == "internlm2"
    short = _logits(model, g["short_input_ids"])
    assert np.abs(short - g["short_logits"]).max() <= 1e-5
    assert abs(_shift_loss(short, g["short_input_ids"]) - float(g["short_loss"])) <= 1e-5
    long = _logits(model, g["long_input_ids"])
    assert np.abs(long - g["long_logits_plain"]).max() <= 1e-5
    assert abs(_shift_loss(long, g["long_input_ids"]) - float(g["long_loss_plain"])) <= 1e-5
    mask = torch.from_numpy(g["short_attention_mask_rightpad"])
    rightpad = _logits(model, g["short_input_ids"], attention_mask=mask)
    assert np.abs(rightpad - g["short_logits_rightpad"]).max() <= 1e-5


@needs_shared
def test_each_packed_document_alone_matches_blockdiag_golden():
    g = _golden()
    model = load_model(TINY)
    ids, pos = g["packed_input_ids"], g["packed_position_ids"][0]
    starts = [i for i in range(len(pos)) if pos[i] == 0] + [len(pos)]
    pieces = [_logits(model, ids[:, a:b]) for a, b in zip(starts, starts[1:])]
    assert len(pieces) == 2
    assert np.abs(np.concatenate(pieces, axis=1) - g["packed_logits_blockdiag"]).max() <= 1e-5


@needs_shared
def test_weight_mapping_is_pure_reindexing():
    model = load_model(TINY)
    raw = load_file(TINY / "model.safetensors")
    nh, nkv, H = 8, 2, 64
    d, g = H // nh, nh // nkv
    sd = model.state_dict()
    for i in range(4):
        wqkv = raw[f"model.layers.{i}.attention.wqkv.weight"]
        # row r of wqkv belongs to group r // ((g+2)*d), slot (r // d) % (g+2)
        q_rows = [(k * (g + 2) + j) * d + r for k in range(nkv) for j in range(g) for r in range(d)]
        k_rows = [(k * (g + 2) + g) * d + r for k in range(nkv) for r in range(d)]
        v_rows = [(k * (g + 2) + g + 1) * d + r for k in range(nkv) for r in range(d)]
        p = f"model.layers.{i}."
        assert torch.equal(sd[p + "self_attn.q_proj.weight"], wqkv[q_rows])
        assert torch.equal(sd[p + "self_attn.k_proj.weight"], wqkv[k_rows])
        assert torch.equal(sd[p + "self_attn.v_proj.weight"], wqkv[v_rows])
        for ours, theirs in [("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                             ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
                             ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")]:
            assert torch.equal(sd[p + ours + ".weight"], raw[f"model.layers.{i}.{theirs}.weight"])
    assert torch.equal(sd["lm_head.weight"], raw["output.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], raw["model.tok_embeddings.weight"])
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])  # untied


@needs_shared
def test_export_back_is_bitwise_internlm2(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    (src / "modeling_internlm2.py").write_text("# remote code stand-in\n")
    model = load_model(src)
    out = save_hf(model, tmp_path / "out")
    a, b = load_file(out / "model.safetensors"), load_file(TINY / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)
    assert json.loads((out / "config.json").read_text()) == json.loads((TINY / "config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (TINY / "generation_config.json").read_text())
    assert (out / "modeling_internlm2.py").read_text() == "# remote code stand-in\n"
    assert (out / "tokenizer.model").read_bytes() == (TINY / "tokenizer.model").read_bytes()
    assert load_model(out).evotune_source.format == "internlm2"


@needs_shared
def test_export_native_llama_layout_gives_same_model(tmp_path):
    model = load_model(TINY)
    out = save_hf(model, tmp_path / "out", save_format="huggingface")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    again = load_model(out)
    assert type(again).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- synthetic InternLM2 folders


def make_internlm2(path: Path, seed: int = 0, **overrides) -> Path:
    """A random InternLM2 folder in the published layout (names and shapes from the InternLM2 spec)."""
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
           "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "vocab_size": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000,
           "max_position_embeddings": 16, "rope_scaling": None, "tie_word_embeddings": False,
           "torch_dtype": "float32", "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}}
    cfg.update(overrides)
    gen = torch.Generator().manual_seed(seed)
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = H // cfg["num_attention_heads"]
    rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d
    sd = {"model.tok_embeddings.weight": (V, H), "model.norm.weight": (H,), "output.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "attention.wqkv.weight": (rows, H), p + "attention.wo.weight": (H, H),
                   p + "feed_forward.w1.weight": (inter, H), p + "feed_forward.w3.weight": (inter, H),
                   p + "feed_forward.w2.weight": (H, inter), p + "attention_norm.weight": (H,),
                   p + "ffn_norm.weight": (H,)})
        if cfg["bias"]:
            sd.update({p + "attention.wqkv.bias": (rows,), p + "attention.wo.bias": (H,)})
    tensors = {k: torch.randn(*s, generator=gen) * 0.2 for k, s in sd.items()}
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_bias_maps_to_llama_attention_bias_and_round_trips(tmp_path):
    src = make_internlm2(tmp_path / "src", bias=True)
    model = load_model(src)
    assert model.config.attention_bias is True
    raw = load_file(src / "model.safetensors")
    # 4 heads / 2 kv heads: group = [q, q, k, v] of d=8 rows each
    b = raw["model.layers.1.attention.wqkv.bias"].view(2, 4, 8)
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.bias"], b[:, :2].reshape(-1))
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.bias"], b[:, 2].reshape(-1))
    assert torch.equal(sd["model.layers.1.self_attn.v_proj.bias"], b[:, 3].reshape(-1))
    assert torch.equal(sd["model.layers.1.self_attn.o_proj.bias"], raw["model.layers.1.attention.wo.bias"])
    out = load_file(save_hf(model, tmp_path / "out") / "model.safetensors")
    assert set(out) == set(raw) and all(torch.equal(out[k], raw[k]) for k in raw)


def _remote_dynamic_inv_freq(theta: float, dim: int, factor: float, max_pos: int, seq_len: int):
    """InternLM2 remote code's dynamic NTK (float64 reference)."""
    base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def test_dynamic_ntk_rope_matches_internlm2_formula(tmp_path):
    src = make_internlm2(tmp_path / "src", rope_scaling={"type": "dynamic", "factor": 2.0})
    model = load_model(src)
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    rope = model.model.rotary_emb
    short = torch.arange(10)[None]
    model(torch.randint(0, 64, (1, 10)), position_ids=short)
    base = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    assert torch.allclose(rope.inv_freq.double(), base, rtol=1e-6, atol=0)
    model(torch.randint(0, 64, (1, 40)))  # longer than max_position_embeddings=16
    want = _remote_dynamic_inv_freq(10000, 8, 2.0, 16, 40)
    assert torch.allclose(rope.inv_freq.double(), want, rtol=1e-6, atol=0)
    assert not torch.allclose(want, base, rtol=1e-3)


def test_linear_rope_scales_positions(tmp_path):
    src = make_internlm2(tmp_path / "src", rope_scaling={"type": "linear", "factor": 4.0})
    model = load_model(src)
    x = torch.zeros(1, 5, 8)
    cos, _ = model.model.rotary_emb(x, torch.arange(5)[None])
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    angles = (torch.arange(5, dtype=torch.float64)[:, None] / 4.0) * inv[None]
    assert torch.allclose(cos[0].double(), torch.cat([angles, angles], -1).cos(), atol=1e-6)


def test_config_errors(tmp_path):
    src = make_internlm2(tmp_path / "a", rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(EvotuneError, match="rope_scaling type 'yarn'"):
        load_model(src)
    src = make_internlm2(tmp_path / "b")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvotuneError, match="key 'hidden_size' is missing"):
        load_model(src)
    src = make_internlm2(tmp_path / "c", num_hidden_layers=3)  # weights for 3 layers ...
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 2  # ... config says 2
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvotuneError, match="do not match the config"):
        load_model(src)


def test_bfloat16_load_and_export_keep_dtype(tmp_path):
    src = make_internlm2(tmp_path / "src")
    model = load_model(src, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    out = save_hf(model, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    raw = load_file(src / "model.safetensors")
    back = load_file(out / "model.safetensors")
    assert all(torch.equal(back[k], raw[k].to(torch.bfloat16)) for k in raw)
    assert math.isclose(cfg["rms_norm_eps"], 1e-6)


def test_bin_shards_and_stray_inv_freq_buffers_load(tmp_path):
    src = make_internlm2(tmp_path / "src")
    raw = load_file(src / "model.safetensors")
    ref = load_model(src)
    (src / "model.safetensors").unlink()
    half = len(raw) // 2
    keys = sorted(raw)
    torch.save({k: raw[k] for k in keys[:half]}, src / "pytorch_model-00001-of-00002.bin")
    torch.save({**{k: raw[k] for k in keys[half:]}, "model.layers.0.attention.rotary_emb.inv_freq": torch.ones(4)},
               src / "pytorch_model-00002-of-00002.bin")
    model = load_model(src)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.state_dict().items())
