"""InternEvo checkpoints (model_config.pt + model_tp{t}_pp{p}.pt) <-> Hugging Face, any tp/pp."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evotune.convert import hf2internevo, internevo2hf
from evotune.checkpoint.internevo import InternEvoCheckpoint, load_model_config, partition_uniform
from evotune.errors import EvotuneError
from evotune.model.load import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CONF = SHARED / "conformance" / "internlm2"
TINY = CONF / "tiny_internlm2"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="../shared conformance data not present")


def _tiny() -> dict[str, torch.Tensor]:
    return load_file(TINY / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_shards(folder: Path, fn) -> None:
    for f in sorted(folder.glob("model_tp*_pp*.pt")):
        t, p = (int(x) for x in f.stem.removeprefix("model_tp").split("_pp"))
        torch.save(fn(torch.load(f), t, p), f)


def _edit_config(folder: Path, **changes) -> None:
    cfg = torch.load(folder / "model_config.pt")
    cfg.update(changes)
    torch.save(cfg, folder / "model_config.pt")


def test_partition_uniform_puts_extra_layers_last():
    assert partition_uniform(4, 3) == [(0, 1), (1, 2), (2, 4)]
    assert partition_uniform(4, 2) == [(0, 2), (2, 4)]
    assert partition_uniform(32, 5) == [(0, 6), (6, 12), (12, 18), (18, 25), (25, 32)]
    with pytest.raises(EvotuneError, match="between 1 and the number of layers"):
        partition_uniform(4, 5)


@pytest.mark.parametrize("name", ["internevo_ckpt_tp1pp1", "internevo_ckpt_tp2pp2"])
def test_upstream_checkpoints_convert_to_the_tiny_weights_and_logits(tmp_path, name):
    out = internevo2hf(CONF / name, tmp_path / "hf")
    assert _same(load_file(out / "model.safetensors"), _tiny())
    g = np.load(CONF / "golden_logits.npz")
    model = load_model(CONF / name)  # read directly, no conversion step
    assert model.evotune_source.format == "internevo"
    assert model.evotune_source.config["dtype"] == "float32"
    with torch.no_grad():
        logits = model(torch.from_numpy(g["short_input_ids"])).logits.numpy()
    assert np.abs(logits - g["short_logits"]).max() <= 1e-5


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(EvotuneError, match=r"model_tp1_pp1\.pt is missing"):
        internevo2hf(CONF / "internevo_ckpt_bad", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_writing_tp2pp2_matches_internevo_own_revert(tmp_path):
    out = hf2internevo(TINY, tmp_path / "ie", tp=2, pp=2)
    for t in range(2):
        for p in range(2):
            ours = torch.load(out / f"model_tp{t}_pp{p}.pt")
            theirs = torch.load(CONF / "internevo_ckpt_tp2pp2" / f"model_tp{t}_pp{p}.pt")
            assert _same(ours, theirs), (t, p)
    cfg = torch.load(out / "model_config.pt")
    upstream = torch.load(CONF / "internevo_ckpt_tp2pp2" / "model_config.pt")
    for key in ("num_attention_heads", "num_kv_attention_heads", "hidden_size", "vocab_size", "num_layers",
                "layer_norm_epsilon", "rope_base", "no_bias", "embed_split_hidden", "adapt_hf", "norm_head",
                "dtype", "norm_type", "num_chunks"):
        assert cfg[key] == upstream[key], key


def test_round_trip_hf_to_tp2pp3_to_hf_is_bitwise(tmp_path):
    ie = hf2internevo(TINY, tmp_path / "ie", tp=2, pp=3)
    shards = sorted(p.name for p in ie.glob("model_tp*"))
    assert shards == [f"model_tp{t}_pp{p}.pt" for t in range(2) for p in range(3)]
    layers = [len({k.split(".")[1] for k in torch.load(ie / f"model_tp0_pp{p}.pt") if k.startswith("layers.")})
              for p in range(3)]
    assert layers == [1, 1, 2]
    back = internevo2hf(ie, tmp_path / "hf", tokenizer_path=TINY)
    assert _same(load_file(back / "model.safetensors"), _tiny())
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "internlm2" and "auto_map" in cfg and cfg["intermediate_size"] == 176
    assert (back / "tokenizer.model").is_file()


def test_llama_source_round_trips_through_internevo(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    llama.save_pretrained(tmp_path / "llama")
    ie = hf2internevo(tmp_path / "llama", tmp_path / "ie", tp=2, pp=2)
    back = internevo2hf(ie, tmp_path / "hf", save_format="huggingface")
    assert _same(load_file(back / "model.safetensors"), load_file(tmp_path / "llama" / "model.safetensors"))
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(back)(x).logits, llama(x).logits)


def test_resplit_internevo_to_other_tp_pp(tmp_path):
    ie = hf2internevo(CONF / "internevo_ckpt_tp2pp2", tmp_path / "ie", tp=1, pp=4)
    ckpt = InternEvoCheckpoint(ie)
    assert (ckpt.tp, ckpt.pp, ckpt.stage_layers) == (1, 4, [1, 1, 1, 1])
    assert _same({k: p.load() for k, p in ckpt.plan().items()}, _tiny())


def test_vocab_parallel_embedding_mode(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp2pp2", tmp_path / "src")
    emb = _tiny()["model.tok_embeddings.weight"]

    def to_vocab_parallel(sd, t, p):
        if "tok_embeddings.weight" in sd:
            del sd["tok_embeddings.weight"]
            sd["tok_embeddings.word_embeddings.weight"] = emb[t * 64:(t + 1) * 64].clone()
        return sd

    _edit_shards(src, to_vocab_parallel)
    _edit_config(src, embed_split_hidden=False)
    assert _same(load_file(internevo2hf(src, tmp_path / "hf") / "model.safetensors"), _tiny())


def test_qk_interleaved_checkpoints_are_permuted_back(tmp_path):
    """adapt_hf=False stores q/k GPT-J interleaved: stored row 2j = HF row j, stored row 2j+1 = HF row d/2+j."""
    src = _copy(CONF / "internevo_ckpt_tp1pp1", tmp_path / "src")
    d, g, nkv = 8, 4, 2
    stored_from_hf = [(j // 2) if j % 2 == 0 else d // 2 + j // 2 for j in range(d)]
    rows = []
    for k in range(nkv):
        for slot in range(g + 2):
            base = (k * (g + 2) + slot) * d
            rows += [base + r for r in (stored_from_hf if slot <= g else range(d))]  # v (slot g+1) untouched

    def interleave(sd, t, p):
        for key in [k for k in sd if k.endswith("wqkv.weight")]:
            sd[key] = sd[key][rows].clone()
        return sd

    _edit_shards(src, interleave)
    for flags in ({"adapt_hf": False}, {"adapt_hf": None, "qk_interleaved": True}):
        cfg = torch.load(src / "model_config.pt")
        cfg.pop("adapt_hf", None)
        cfg.update({k: v for k, v in flags.items() if v is not None})
        torch.save(cfg, src / "model_config.pt")
        out = internevo2hf(src, tmp_path / "hf", overwrite=True)
        assert _same(load_file(out / "model.safetensors"), _tiny()), flags
    _edit_config(src, adapt_hf=True, qk_interleaved=True)
    with pytest.raises(EvotuneError, match="contradict"):
        internevo2hf(src, tmp_path / "hf", overwrite=True)


def test_missing_adapt_hf_means_true(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp2pp2", tmp_path / "src")
    cfg = torch.load(src / "model_config.pt")
    del cfg["adapt_hf"]
    torch.save(cfg, src / "model_config.pt")
    assert _same(load_file(internevo2hf(src, tmp_path / "hf") / "model.safetensors"), _tiny())


def test_legacy_w2_w3_era_is_detected_from_shapes(tmp_path):
    """Before 2024 InternEvo computed w3(silu(w1 x) * w2 x): w2 = up (dim-0 split), w3 = down (dim-1 split)."""
    src = _copy(CONF / "internevo_ckpt_tp2pp2", tmp_path / "src")

    def swap(sd, t, p):
        for key in [k for k in sd if k.endswith("feed_forward.w2.weight")]:
            w3 = key.replace("w2", "w3")
            sd[key], sd[w3] = sd[w3], sd[key]
        return sd

    _edit_shards(src, swap)
    assert InternEvoCheckpoint(src).ffn_layout == "w3_down"
    assert _same(load_file(internevo2hf(src, tmp_path / "hf") / "model.safetensors"), _tiny())
    with pytest.raises(EvotuneError, match="merges .* to shape"):
        internevo2hf(src, tmp_path / "hf2", ffn_layout="w2_down")


def test_square_ffn_needs_the_flag(tmp_path):
    """hidden == intermediate/tp: shapes cannot tell the era apart, the user must say."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    ie = hf2internevo(tmp_path / "llama", tmp_path / "ie", tp=1, pp=1)
    with pytest.raises(EvotuneError, match="--ffn-layout"):
        internevo2hf(ie, tmp_path / "hf")
    out = internevo2hf(ie, tmp_path / "hf", ffn_layout="w2_down", save_format="huggingface")
    assert _same(load_file(out / "model.safetensors"), load_file(tmp_path / "llama" / "model.safetensors"))


def test_norm_head_rows_are_normalised(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp2pp2", tmp_path / "src")
    _edit_config(src, norm_head=True)
    out = load_file(internevo2hf(src, tmp_path / "hf") / "model.safetensors")
    w = _tiny()["output.weight"].double()
    want = w / w.pow(2).sum(dim=1, keepdim=True).sqrt()
    assert torch.allclose(out["output.weight"].double(), want, atol=1e-7, rtol=0)
    assert torch.allclose(out["output.weight"].double().norm(dim=1), torch.ones(128, dtype=torch.float64))


def test_pickled_internevo_config_object_loads_without_internevo(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp1pp1", tmp_path / "src")
    plain = torch.load(src / "model_config.pt")
    mod = types.ModuleType("internlm.core.context.config")

    class Config(dict):
        def __getattr__(self, key):
            return self[key]

    Config.__module__, Config.__qualname__ = mod.__name__, "Config"
    mod.Config = Config
    names = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.config"]
    for n in names:
        sys.modules[n] = mod if n == mod.__name__ else types.ModuleType(n)
    try:
        cfg = Config(plain)
        cfg.extra = "attribute state"
        torch.save(cfg, src / "model_config.pt")
    finally:
        for n in names:
            del sys.modules[n]
    with pytest.raises(Exception):
        torch.load(src / "model_config.pt", weights_only=True)
    loaded = load_model_config(src)
    assert type(loaded) is dict and loaded == plain
    assert _same(load_file(internevo2hf(src, tmp_path / "hf") / "model.safetensors"), _tiny())


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def test_other_pickled_classes_are_refused(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp1pp1", tmp_path / "src")
    with open(src / "model_config.pt", "wb") as f:
        pickle.dump({"num_layers": 4, "x": _Evil()}, f, protocol=2)
    with pytest.raises(EvotuneError, match="refusing to unpickle builtins.print"):
        load_model_config(src)


def test_shapes_that_disagree_with_model_config(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp2pp2", tmp_path / "src")
    _edit_config(src, vocab_size=256)
    with pytest.raises(EvotuneError, match=r"tok_embeddings.weight merges \(over tp=2\) to shape \(128, 64\) "
                                           r"but model_config.pt implies \(256, 64\)"):
        internevo2hf(src, tmp_path / "hf")
    _edit_config(src, vocab_size=128, num_layers=6)
    with pytest.raises(EvotuneError, match="hold 4 layers .* num_layers=6"):
        internevo2hf(src, tmp_path / "hf")
    _edit_config(src, num_layers=4, num_kv_attention_heads=4)
    with pytest.raises(EvotuneError, match="wqkv.weight merges"):
        internevo2hf(src, tmp_path / "hf")


def test_tp_must_divide_kv_heads_and_vocab(tmp_path):
    with pytest.raises(EvotuneError, match="--tp 4 does not divide num_key_value_heads=2"):
        hf2internevo(TINY, tmp_path / "a", tp=4, pp=1)
    with pytest.raises(EvotuneError, match="between 1 and the number of layers"):
        hf2internevo(TINY, tmp_path / "b", tp=1, pp=5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unknown_model_type_cannot_become_internevo(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "q")
    with pytest.raises(EvotuneError, match="model_type 'qwen2' cannot become an InternEvo"):
        hf2internevo(tmp_path / "q", tmp_path / "ie", tp=1, pp=1)


def test_folder_without_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(CONF / "internevo_ckpt_tp1pp1" / "model_config.pt", src)
    with pytest.raises(EvotuneError, match="no model_tp"):
        internevo2hf(src, tmp_path / "hf")
    torch.save({}, src / "model_wp0_pp0.pt")
    with pytest.raises(EvotuneError, match="weight-parallel"):
        internevo2hf(src, tmp_path / "hf")


def test_ignores_non_model_files_and_inv_freq(tmp_path):
    src = _copy(CONF / "internevo_ckpt_tp2pp2", tmp_path / "src")
    torch.save({"x": 1}, src / "context.pt")
    (src / "topo_tp0_pp0.json").write_bytes(b"\x80\x04junk")
    (src / "10.step").write_text("")

    def add_inv_freq(sd, t, p):
        sd["layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
        return sd

    _edit_shards(src, add_inv_freq)
    assert _same(load_file(internevo2hf(src, tmp_path / "hf") / "model.safetensors"), _tiny())


def test_tied_and_biased_llama_through_internevo(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         attention_bias=True))
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    llama.save_pretrained(tmp_path / "llama")
    ie = hf2internevo(tmp_path / "llama", tmp_path / "ie", tp=2, pp=1)
    cfg = torch.load(ie / "model_config.pt")
    assert cfg["no_bias"] is False
    shard = torch.load(ie / "model_tp1_pp0.pt")
    emb = llama.model.embed_tokens.weight.detach()
    assert torch.equal(shard["output.weight"], emb[32:])  # InternEvo has no tied head: written out
    assert torch.equal(shard["layers.0.attention.wo.bias"], llama.model.layers[0].self_attn.o_proj.bias.detach())
    back = load_model(internevo2hf(ie, tmp_path / "hf", save_format="huggingface"))
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(x).logits, llama(x).logits)


def test_model_config_dtype_is_read_with_the_one_dtype_parser(tmp_path):
    """InternEvo configs spell dtypes 'torch.bfloat16': read as bfloat16; an unknown one names the file,
    unless a dtype is asked for."""
    ckpt = _copy(CONF / "internevo_ckpt_tp1pp1", tmp_path / "ckpt")
    _edit_config(ckpt, dtype="torch.bfloat16")
    assert json.loads((internevo2hf(ckpt, tmp_path / "hf") / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _edit_config(ckpt, dtype="torch.tf32")
    with pytest.raises(EvotuneError, match=r"model_config.pt dtype: unknown dtype 'torch.tf32'"):
        load_model(ckpt)
    assert next(load_model(ckpt, dtype="float32").parameters()).dtype == torch.float32
