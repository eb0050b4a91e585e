"""Shared fixtures: tiny models and small InternEvo folders, made per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("EVOTUNE_CACHE", str(REPO / ".pytest_cache" / "evotune_ftdp"))
torch.set_num_threads(2)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def whole_document_pack(docs: list[list[int]]) -> dict:
    """One pack holding whole documents, InternEvo labels (next token, -100 at doc end)."""
    ids, labels, pos, cu = [], [], [], [0]
    for d in docs:
        ids += d
        labels += d[1:] + [-100]
        pos += list(range(len(d)))
        cu.append(cu[-1] + len(d))
    return {"input_ids": np.array(ids), "labels": np.array(labels), "position_ids": np.array(pos),
            "cu_seqlens": np.array(cu, dtype=np.int32), "type_ids": np.zeros(len(ids), dtype=np.int64)}


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    with torch.no_grad():  # non-trivial norms so tests see their gradients
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return str(path)


def write_folder(root: Path, files: dict[str, list[list[int]]]) -> str:
    """Write ``{relative .bin path: documents}`` under ``root``; returns root."""
    from evotune.data.ftdp_write import write_bin

    for rel, docs in files.items():
        write_bin(root / rel, docs)
    return str(root)


def random_documents(rng: np.random.RandomState, n: int, low: int = 3, high: int = 60, vocab: int = 128):
    """Learnable documents: each counts up from a random start with a step of 1 or 2."""
    docs = []
    for _ in range(n):
        length = int(rng.randint(low, high))
        start, stride = rng.randint(0, vocab - 3), rng.randint(1, 3)
        doc = 3 + (start + stride * np.arange(length)) % (vocab - 3)
        # some negative (input-only) tokens, as InternEvo SFT data has
        mask = rng.rand(length) < 0.2
        doc[mask] = -doc[mask]
        docs.append(doc.tolist())
    return docs


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> str:
    rng = np.random.RandomState(0)
    root = tmp_path_factory.mktemp("small_folder")
    return write_folder(root, {
        "cn/ds1/a.bin": random_documents(rng, 40),
        "en/ds2/b.bin": random_documents(rng, 60),
    })
