"""Hugging Face hub ids (``org/name``) wherever a model or tokenizer path is taken.

XTuner configs name models by hub id (``pretrained_model_name_or_path =
'internlm/internlm2-7b'``). :func:`resolve` turns such an id into the folder of
its snapshot in the Hugging Face cache, so the loaders (evotune/model/load.py)
only ever see local folders:

* a path that exists is used as it is (a local folder wins over a hub id of
  the same spelling);
* ``org/name`` (optionally ``org/name@revision``) that is not a local path is
  looked up in the cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) and downloaded into it when online;
* with ``HF_HUB_OFFLINE=1`` only the cache is read; an id that is not cached is
  one line saying so, with the command that fetches it.

Under torch.distributed rank 0 resolves (and downloads) first while the others
wait at a barrier, then they read the same cache; huggingface_hub's own file
locks keep separate processes on one machine from downloading a file twice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from evotune.data.ftdp import distributed
from evotune.errors import EvotuneError

# a hub repository id: one '/', names of letters, digits, '-', '_', '.' (huggingface_hub's rule), maybe @revision
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?")
# the files a tokenizer needs (with config.json, which tokenizer classes read)
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                      "*.model", "config.json", "generation_config.json"]


def hub_cache() -> str:
    """The hub cache folder as huggingface_hub computes it, read from the environment now (tests set it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_id(path) -> tuple[str, str | None] | None:
    """``(repo id, revision)`` when ``path`` is a hub id and no local file or folder, else None."""
    text = os.fspath(path)
    if os.path.exists(text) or text.startswith((".", "/", "~")) or "\\" in text:
        return None
    m = _HUB_ID.fullmatch(text)
    if m is None or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def resolve(path, tokenizer_only: bool = False):
    """``path`` itself, or the local snapshot folder of the hub id ``path`` (see module doc).

    ``tokenizer_only``: download only the tokenizer's files (the cache may hold more).
    """
    found = hub_id(path)
    if found is None:
        return path
    repo, revision = found
    dist = distributed()
    if dist is not None and dist.get_rank() != 0:
        dist.barrier()  # rank 0 downloads first
        return Path(_snapshot(repo, revision, tokenizer_only, local_only=True))
    try:
        folder = _snapshot(repo, revision, tokenizer_only, local_only=offline())
    finally:
        if dist is not None:
            dist.barrier()
    return Path(folder)


def _snapshot(repo: str, revision: str | None, tokenizer_only: bool, local_only: bool) -> str:
    cache = hub_cache()
    fetch = f"`hf download {repo}`" + (f" --revision {revision}" if revision else "") + \
            f" (older huggingface_hub: `huggingface-cli download {repo}`)"
    try:
        return huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=cache, local_files_only=local_only,
            allow_patterns=TOKENIZER_PATTERNS if tokenizer_only else None)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise EvotuneError(f"{repo}: no such model on the Hugging Face hub, or it is gated/private "
                           f"(log in with `hf auth login`); or give a local folder ({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise EvotuneError(f"{repo}: the hub has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        if local_only:
            why = "HF_HUB_OFFLINE=1" if offline() else "rank 0 did not download it"
            raise EvotuneError(f"{repo} is not a local folder and not in the Hugging Face cache {cache} ({why}); "
                               f"fetch it on a machine with network with {fetch}, or give a local folder") from None
        raise EvotuneError(f"{repo}: the Hugging Face hub cannot be reached and the model is not in the cache "
                           f"{cache}; fetch it with {fetch} when online, or give a local folder") from None
