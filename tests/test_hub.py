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


DIST_SCRIPT = """
import json, shutil, sys, time
from pathlib import Path
import torch.distributed as dist
from evotune.model import hub
rank, port, cache, files = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
real = hub.huggingface_hub.snapshot_download
calls = []

def download(repo, **kw):  # rank 0 'downloads': slowly writes the cache layout, then reads it
    calls.append(kw["local_files_only"])
    time.sleep(2)
    entry = cache / "models--org--late"
    shutil.copytree(files, entry / "snapshots" / "%s")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("%s")
    return real(repo, **{**kw, "local_files_only": True})

if rank == 0:
    hub.huggingface_hub.snapshot_download = download
print(json.dumps({"path": str(hub.resolve("org/late")), "online_calls": calls}))
dist.destroy_process_group()
""" % (SHA, SHA)


def test_rank0_downloads_while_the_others_wait(tmp_path, tiny_llama_dir):
    """Online: only rank 0 downloads; rank 1 reads the cache only (local_files_only), after rank 0 is done."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_CACHE=str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", DIST_SCRIPT, str(rank), str(port), str(tmp_path / "hub"),
                               tiny_llama_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    snapshot = str(tmp_path / "hub" / "models--org--late" / "snapshots" / SHA)
    assert results == [{"path": snapshot, "online_calls": [False]}, {"path": snapshot, "online_calls": []}]
