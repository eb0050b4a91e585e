"""Every micro-batch of every InternEvo golden case, field by field (../shared/conformance/internevo_data)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from evotune.data.ftdp import load_intern_repo_tokenized_dataset
from evotune.data.packing import build_packed_dataset
from evotune.data.sampler import InternRepoSampler

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "conformance" / "internevo_data"
INDEX = GOLDEN / "golden" / "index.json"
CASES = json.loads(INDEX.read_text())["cases"] if INDEX.exists() else []
FIELDS = [("input_ids", "input_ids"), ("labels", "labels"), ("cu_seqlens", "cu_seqlens"),
          ("position_ids", "indexes"), ("type_ids", "type_ids")]

pytestmark = pytest.mark.skipif(not CASES, reason="../shared/conformance/internevo_data is absent")


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Index caches go to a temporary folder, never into ../shared."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("ftdp-cache")
        mp.setenv("EVOTUNE_CACHE", str(path))
        yield path


@lru_cache(maxsize=None)
def _folder(train_folder: str, min_length: int):
    return load_intern_repo_tokenized_dataset(str(GOLDEN / train_folder), min_length=min_length)


def _golden(case: dict) -> dict:
    return json.loads((GOLDEN / "golden" / case["file"]).read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_golden_case(case):
    g = _golden(case)
    p = g["params"]
    ds = build_packed_dataset(_folder(p["train_folder"], p["min_length"]), p["packed_length"], seed=p["seed"],
                              max_length_per_sample=p["seq_len"], pack_sample_into_one=p["pack_sample_into_one"])
    assert len(ds) == g["num_packs_total"]
    assert ds.type_names == g["type_names"]
    assert [f.rel_path for f in ds.folder.files] == [d["path"] for d in g["datasets"]]
    for d, plan in zip(g["datasets"], ds.plans):
        assert plan.file.type_id == d["type_id"]
        assert len(plan.first_doc) == d["num_packs"]
        assert plan.doc_rows.tolist() == [d["kept_doc_rows"][i] for i in d["doc_order"]]
    for rank in g["ranks"]:
        sampler = InternRepoSampler(ds, shuffle=True, dp_size=p["dp_world"], dp_rank=rank["dp_rank"],
                                    micro_num=p["micro_num"])
        assert sampler.steps_per_epoch == g["steps_per_epoch"]
        stream = iter(sampler)
        for step in rank["steps"]:
            ids = [next(stream) for _ in range(p["micro_num"])]
            assert ids == step["pack_ids"], f"rank {rank['dp_rank']} step {step['step']}"
            for pack_id, micro in zip(ids, step["micro_batches"]):
                pack = ds[pack_id]
                for ours, theirs in FIELDS:
                    assert pack[ours].tolist() == micro[theirs], f"step {step['step']} pack {pack_id} {ours}"
            assert sampler.epoch == step["epoch"]
    pack = ds[0]
    assert {k: (v.dtype.name, v.shape) for k, v in pack.items()} == {
        "input_ids": ("int64", (ds.packed_length,)), "labels": ("int64", (ds.packed_length,)),
        "position_ids": ("int64", (ds.packed_length,)), "type_ids": ("int64", (ds.packed_length,)),
        "cu_seqlens": ("int32", (len(pack["cu_seqlens"]),))}
