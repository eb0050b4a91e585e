"""The small shared pieces of the formats layer: dtype names, the model-source record, the atomic
directory writer and the tokenizer file list."""

from __future__ import annotations

import json

import pytest
import torch

from evotune.checkpoint import dcp
from evotune.checkpoint.atomic import AtomicDir, remove_leftovers
from evotune.checkpoint.hf import TOKENIZER_FILES, save_hf
from evotune.checkpoint.source import ModelSource
from evotune.dtypes import dtype_name, parse_dtype
from evotune.errors import EvotuneError
from evotune.model.load import load_model, load_tokenizer


def test_one_dtype_parser_for_every_spelling():
    for spelling, want in [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                           ("fp16", torch.float16), ("half", torch.float16), ("float32", torch.float32),
                           ("fp32", torch.float32), (torch.float16, torch.float16)]:
        assert parse_dtype(spelling) is want
    assert parse_dtype(None) is None and parse_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert [dtype_name(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == ["bfloat16", "float16", "float32"]
    with pytest.raises(EvotuneError, match=r"^optim_wrapper.dtype: unknown dtype 'float8'"):
        parse_dtype("float8", what="optim_wrapper.dtype")


def test_model_source_reads_the_records_older_checkpoints_wrote():
    old = {"format": "internlm2", "path": "/models/internlm2-7b", "config": {"model_type": "internlm2", "bias": False}}
    source = ModelSource.from_json(json.loads(json.dumps(old)))
    assert (source.format, source.path, source.config) == ("internlm2", "/models/internlm2-7b", old["config"])
    assert source.to_json() == old
    assert ModelSource.from_json(None) is None  # a checkpoint of a model built in Python
    with pytest.raises(EvotuneError, match="state.json model_source: .* is not a model source record"):
        ModelSource.from_json({"path": "/x"}, where="state.json model_source")
    with pytest.raises(EvotuneError, match="format 'gguf': must be one of hf, internlm2, internevo"):
        ModelSource("gguf")


def test_model_source_written_in_trainer_state_as_its_record(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    source = ModelSource("hf", "/models/qwen", {"model_type": "qwen2"})
    path = dcp.save_checkpoint(str(tmp_path), 1, model=model, optimizer=optimizer, scheduler=scheduler,
                               train_state={"step": 1, "model_source": source})
    state = dcp.read_trainer_state(path)
    assert state["model_source"] == {"format": "hf", "path": "/models/qwen", "config": {"model_type": "qwen2"}}
    assert ModelSource.from_json(state["model_source"]) == source


def test_atomic_dir_leaves_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out"
    with AtomicDir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(EvotuneError, match="exists and is not empty"):
        AtomicDir(target)
    with pytest.raises(RuntimeError, match="crash"):
        with AtomicDir(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the half-written folder is gone
    with AtomicDir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with AtomicDir(a_file, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"] and (a_file / "c.txt").is_file()


def test_remove_leftovers_puts_back_a_folder_set_aside_by_a_crash_between_renames(tmp_path):
    (tmp_path / ".tmp_step_3").mkdir()  # a save that crashed while writing
    (tmp_path / ".old_step_2").mkdir()  # step_2 set aside, the new step_2 never renamed into place
    (tmp_path / ".old_step_2" / "weights").write_text("complete")
    (tmp_path / "step_1").mkdir()
    (tmp_path / ".old_step_1").mkdir()  # step_1 replaced: the set-aside copy is stale
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]
    assert (tmp_path / "step_2" / "weights").read_text() == "complete"


def test_one_tokenizer_file_list_for_loading_and_export(tmp_path, tiny_llama_dir):
    """A T5-style folder (spiece.model) is a tokenizer folder, and export copies that file too."""
    assert "spiece.model" in TOKENIZER_FILES and "chat_template.jinja" in TOKENIZER_FILES
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    assert load_tokenizer(tok_dir) is None
    (tok_dir / "spiece.model").write_bytes(b"not really a model")
    (tok_dir / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(EvotuneError, match="cannot build a tokenizer"):
        load_tokenizer(tok_dir)  # seen as a tokenizer folder (a broken one), not as "no tokenizer"
    out = save_hf(load_model(tiny_llama_dir), tmp_path / "hf", tokenizer_path=tok_dir)
    assert (out / "spiece.model").read_bytes() == b"not really a model"
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"


COLLECTIVE_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from evotune.checkpoint.atomic import AtomicDir
rank, port, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
with AtomicDir(target, overwrite=True, collective=True) as tmp:
    seen_inside = sorted(os.listdir(target))
    (tmp / f"rank_{rank}.txt").write_text(str(rank))
seen_after = sorted(os.listdir(target))
print(json.dumps({"inside": seen_inside, "after": seen_after, "parent": sorted(os.listdir(os.path.dirname(target)))}))
dist.destroy_process_group()
"""


def test_collective_atomic_dir_renames_once_every_rank_has_written(tmp_path):
    """Two gloo ranks write one folder: inside the block the old folder is still in place; once any
    rank leaves, the folder holds both ranks' files and nothing temporary is left."""
    import socket
    import subprocess
    import sys

    target = tmp_path / "step_2"
    target.mkdir()
    (target / "old.txt").write_text("previous save")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVE_SCRIPT, str(r), str(port), str(target)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    for out, _ in outs:
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen == {"inside": ["old.txt"], "after": ["rank_0.txt", "rank_1.txt"], "parent": ["step_2"]}
