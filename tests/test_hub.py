"""Hub ids (issue 14 part 2): ``org/name`` resolves through the Hugging Face cache; no network here.

The cache is built by hand in huggingface_hub's layout
(``models--org--name/snapshots/<sha>/``, ``refs/main``), and every test runs
with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from evotune.errors import EvotuneError
from evotune.model import hub
from evotune.model.load import load_model, load_tokenizer

SHA = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo: str, files_from: Path, sha: str = SHA) -> Path:
    """Put the files of ``files_from`` into ``cache`` as huggingface_hub stores ``repo`` at ``sha`` (refs/main)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / sha
    shutil.copytree(files_from, snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(sha)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_the_cached_snapshot_offline(offline_cache, tiny_llama_dir):
    snapshot = make_hub_cache(offline_cache, "evotune-test/tiny-llama", Path(tiny_llama_dir))
    assert hub.resolve("evotune-test/tiny-llama") == snapshot
    model = load_model("evotune-test/tiny-llama")
    local = load_model(tiny_llama_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.evotune_source.path == str(snapshot)


def test_hf_hub_cache_variable_and_revision(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = "fedcba9876543210fedcba9876543210fedcba98"
    make_hub_cache(tmp_path / "elsewhere", "org/m", Path(tiny_llama_dir))
    pinned = tmp_path / "elsewhere" / "models--org--m" / "snapshots" / other
    shutil.copytree(tiny_llama_dir, pinned)
    assert hub.resolve("org/m") == tmp_path / "elsewhere" / "models--org--m" / "snapshots" / SHA
    assert hub.resolve(f"org/m@{other}") == pinned


def test_tokenizer_by_hub_id(offline_cache, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tok_dir)
    make_hub_cache(offline_cache, "org/tok", tok_dir)
    tok = load_tokenizer("org/tok")
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [3, 4]


def test_offline_and_not_cached_is_one_line_with_the_fetch_command(offline_cache):
    with pytest.raises(EvotuneError) as e:
        load_model("internlm/internlm2-20b")
    message = str(e.value)
    assert "\n" not in message
    assert "internlm/internlm2-20b is not a local folder and not in the Hugging Face cache" in message
    assert str(offline_cache) in message and "HF_HUB_OFFLINE=1" in message
    assert "`hf download internlm/internlm2-20b`" in message
    assert "`huggingface-cli download internlm/internlm2-20b`" in message


def test_local_folder_wins_and_paths_are_not_hub_ids(offline_cache, tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama_dir, tmp_path / "org" / "name")
    assert hub.resolve("org/name") == "org/name"  # exists here: used as it is, the cache is not asked
    for path in ("./org/missing", "/abs/missing", "a/b/c", "name-only", "org/../x"):
        assert hub.hub_id(path) is None, path
    with pytest.raises(EvotuneError, match="model path a/b/c does not exist"):
        load_model("a/b/c")
