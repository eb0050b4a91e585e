"""load_model / load_tokenizer / save_hf on plain Hugging Face directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evotune.checkpoint.hf import LazyWeights, save_hf
from evotune.errors import EvotuneError
from evotune.model.load import load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "conformance" / "internlm2" / "tiny_internlm2"


def _qwen(tmp_path: Path, tied: bool = True, dtype=torch.float32) -> tuple[Path, torch.nn.Module]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    path = tmp_path / "qwen"
    model.save_pretrained(path)
    return path, model


def _equal_states(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_dir_loads_natively_with_same_logits(tmp_path):
    path, ref = _qwen(tmp_path)
    model = load_model(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.evotune_source.format == "hf"
    assert model.evotune_source.config["model_type"] == "qwen2"
    x = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


@pytest.mark.parametrize("dtype, want", [(None, torch.bfloat16), ("auto", torch.bfloat16),
                                         ("float32", torch.float32), (torch.float16, torch.float16)])
def test_dtype_argument(tmp_path, dtype, want):
    path, _ = _qwen(tmp_path, dtype=torch.bfloat16)
    assert load_model(path, dtype=dtype).dtype == want


def test_unknown_dtype_is_a_clear_error(tmp_path):
    path, _ = _qwen(tmp_path)
    with pytest.raises(EvotuneError, match="unknown dtype 'float8'"):
        load_model(path, dtype="float8")


def test_save_hf_round_trip_is_bitwise_and_keeps_tied_head(tmp_path):
    path, _ = _qwen(tmp_path, tied=True)
    model = load_model(path)
    out = save_hf(model, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in LazyWeights(out)  # tied: written once, re-tied on load
    again = load_model(out)
    assert _equal_states(model.state_dict(), again.state_dict())
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


def test_save_hf_from_state_dict_and_config_with_dtype_and_shards(tmp_path):
    path, ref = _qwen(tmp_path, tied=False)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    out = save_hf(state, tmp_path / "out", config=ref.config, dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = load_model(out)
    assert again.dtype == torch.bfloat16
    assert _equal_states({k: v.to(torch.bfloat16) for k, v in state.items()}, again.state_dict())


def test_save_hf_refuses_non_empty_dir_and_overwrites_atomically(tmp_path):
    path, _ = _qwen(tmp_path)
    model = load_model(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(EvotuneError, match="exists and is not empty"):
        save_hf(model, out)
    save_hf(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_state_dict_without_config_is_an_error(tmp_path):
    with pytest.raises(EvotuneError, match="needs config="):
        save_hf({"w": torch.zeros(2)}, tmp_path / "out")


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(EvotuneError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvotuneError, match="neither config.json"):
        load_model(tmp_path / "empty")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EvotuneError, match="no weights"):
        load_model(noweights)
    path, _ = _qwen(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvotuneError, match="model_type 'no_such_model' is not known"):
        load_model(path)


def test_load_tokenizer_none_without_tokenizer_files(tmp_path):
    path, _ = _qwen(tmp_path)
    assert load_tokenizer(path) is None


needs_shared = pytest.mark.skipif(not TINY.is_dir(), reason="../shared conformance data not present")


@needs_shared
@pytest.mark.parametrize("model_file", [TINY / "tokenizer.model", SHARED / "tokenizers" / "internlm2.model"])
def test_internlm2_tokenizer_matches_sentencepiece(model_file):
    import sentencepiece as spm

    if not model_file.is_file():
        pytest.skip(f"{model_file} not present")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = load_tokenizer(model_file)
    texts = ["Hello  world\n 你好", "  leading spaces", "a\tb\r\nc", "emoji 😀 ok", "trailing   ", "",
             "数字123 4567.89", "def f(x):\n    return x\n", "é́ NFKC ﬁ ①"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), text
        if sp.unk_id() not in ids:  # <unk> is a special token: written literally, not as sentencepiece's " ⁇ "
            assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text


@needs_shared
def test_internlm2_dir_tokenizer_without_remote_code(tmp_path):
    import sentencepiece as spm

    tok = load_tokenizer(TINY)
    sp = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.encode("hello world") == [1] + sp.encode("hello world")
    # the special tokens split the text, as the published InternLM2Tokenizer does
    assert tok.encode("hi</s>yo") == [1] + sp.encode("hi") + [2] + sp.encode("yo")
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode("hello world") == tok.encode("hello world")
