"""The .bin/.bin.meta reader: parser against json.loads, cache keys and location, walk order, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from evotune.cli import main as cli_main
from evotune.data import ftdp
from evotune.data.ftdp import load_intern_repo_tokenized_dataset, walk_data_files
from evotune.data.ftdp_write import write_bin
from evotune.errors import EvotuneError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("EVOTUNE_CACHE", str(path))
    return path


def _docs(rng, n, low=0, high=40):
    out = []
    for _ in range(n):
        d = rng.randint(0, 100_000, size=rng.randint(low, high))
        d[rng.rand(len(d)) < 0.2] *= -1
        out.append(d.tolist())
    return out


def _write_meta(path: Path, rows, dtype=np.int64) -> None:
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.asarray(rows, dtype=dtype).reshape(-1, 2))


def _write_lines(path: Path, lines: list[bytes], lengths: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(line) for line in lines])[:-1]
    path.write_bytes(b"".join(lines))
    _write_meta(path, list(zip(offsets, lengths)))


def _reference(path: Path) -> list[list[int]]:
    """Every document by json.loads at its meta offset, as InternEvo's JsonlDataset reads it."""
    meta = np.load(open(str(path) + ".meta", "rb"))
    data = path.read_bytes()
    out = []
    for offset in meta[:, 0]:
        end = data.find(b"\n", int(offset))
        out.append(json.loads(data[int(offset):None if end < 0 else end])["tokens"])
    return out


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_parser_matches_json_loads(tmp_path, monkeypatch, chunk):
    """Canonical lines, extra keys, CRLF, odd spacing, empty documents, no final newline, small chunks."""
    monkeypatch.setattr(ftdp, "_CHUNK", chunk)
    rng = np.random.RandomState(0)
    docs = _docs(rng, 80)
    lines = []
    for i, d in enumerate(docs):
        if i % 7 == 3:
            lines.append(json.dumps({"tokens": d, "meta": {"src": "x,y [1]", "n": i}}, ensure_ascii=False).encode())
        elif i % 11 == 5:
            lines.append(b'{ "tokens" : [' + b" ,  ".join(str(t).encode() for t in d) + b"]  }\r")
        else:
            lines.append(json.dumps({"tokens": d}).encode())
    body = [line + b"\n" for line in lines]
    body[-1] = body[-1][:-1]  # the last line has no newline
    _write_lines(tmp_path / "data" / "a.bin", body, [len(d) for d in docs])
    folder = load_intern_repo_tokenized_dataset(tmp_path / "data")
    (f,) = folder.files
    assert [f.document(r).tolist() for r in range(len(docs))] == _reference(tmp_path / "data" / "a.bin") == docs
    assert f.tokens.dtype == np.int32 and isinstance(f.tokens.base, np.memmap)
    assert folder.max_token_id == max(abs(t) for d in docs for t in d)


def test_meta_extra_columns_and_rows_that_repeat_skip_or_reorder_lines(tmp_path):
    """Rows must map one-to-one onto line starts, in order (a repeated line would be trained twice)."""
    docs = [[1, 2, 3], [4], [5, 6]]
    lines = [json.dumps({"tokens": d}).encode() + b"\n" for d in docs]
    offsets = [0, len(lines[0]), len(lines[0]) + len(lines[1])]
    path = tmp_path / "d" / "x.bin"
    _write_lines(path, lines, [3, 1, 2])
    with open(str(path) + ".meta", "wb") as fh:  # three columns (length last)
        np.save(fh, np.array([[offsets[0], 9, 3], [offsets[1], 9, 1], [offsets[2], 9, 2]], dtype=np.int32))
    (f,) = load_intern_repo_tokenized_dataset(tmp_path / "d").files
    assert [f.document(r).tolist() for r in range(3)] == docs
    for rows, bad_row, bad_line in (([0, 0, 2], 1, 1), ([2, 1, 0], 0, 3)):  # repeats line 1 and skips 2; reversed
        with open(str(path) + ".meta", "wb") as fh:
            np.save(fh, np.array([[offsets[r], len(docs[r])] for r in rows], dtype=np.int64))
        with pytest.raises(EvotuneError, match=rf"row {bad_row} points at line {bad_line} of .*x.bin, but row "
                                               rf"{bad_row} must point at line {bad_row + 1} \(one row per line"):
            load_intern_repo_tokenized_dataset(tmp_path / "d")


def test_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path, cache, monkeypatch):
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1, 2, 3], [4, 5]])
    calls = []
    real = ftdp._parse_bin
    monkeypatch.setattr(ftdp, "_parse_bin", lambda *a: calls.append(a[0]) or real(*a))
    load_intern_repo_tokenized_dataset(tmp_path / "d")
    load_intern_repo_tokenized_dataset(tmp_path / "d")
    assert len(calls) == 1
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    write_bin(path, [[7, 8], [9, 10, 11, 12]])
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    (f,) = load_intern_repo_tokenized_dataset(tmp_path / "d").files
    assert len(calls) == 2 and f.document(1).tolist() == [9, 10, 11, 12]
    new_entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert len(new_entries) == len(entries) == 2 and new_entries != entries  # the stale entry is gone


def test_cache_beside_data_or_in_home(tmp_path, monkeypatch):
    monkeypatch.delenv("EVOTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_bin(tmp_path / "d" / "sub" / "a.bin", [[1, 2]])
    load_intern_repo_tokenized_dataset(tmp_path / "d")
    assert len(list((tmp_path / "d" / "sub" / ftdp.CACHE_DIRNAME).glob("a.bin.*.index.npz"))) == 1
    # a folder where the cache cannot be created: the home cache is used
    real = ftdp._writable_dir
    monkeypatch.setattr(ftdp, "_writable_dir", lambda p: not p.endswith(ftdp.CACHE_DIRNAME) and real(p))
    write_bin(tmp_path / "ro" / "b.bin", [[3, 4]])
    (f,) = load_intern_repo_tokenized_dataset(tmp_path / "ro").files
    assert f.document(0).tolist() == [3, 4]
    assert len(list((tmp_path / "home" / ".cache" / "evotune" / "ftdp").rglob("b.bin.*.tokens"))) == 1
    assert not (tmp_path / "ro" / ftdp.CACHE_DIRNAME).exists()


def test_walk_order_type_ids_and_min_length(tmp_path):
    root = tmp_path / "train"
    for rel in ["en/part1.bin", "en/part10.bin", "en/part2.bin", "a/x.bin", "a.b/y.bin", "a/z/w.bin", "top.bin"]:
        write_bin(root / rel, [[1] * 3, [2] * 8])
    (root / "en" / "notes.txt").write_text("ignored")
    os.symlink(root / "a", root / "link")
    os.symlink(root / "a", root / "a" / "z" / "loop")  # a loop is not followed
    order = walk_data_files(str(root))
    # names sorted per folder, files of a folder before its sub-folders, links followed
    assert order == ["top.bin", "a/x.bin", "a/z/w.bin", "a.b/y.bin", "en/part1.bin", "en/part10.bin",
                     "en/part2.bin", "link/x.bin", "link/z/w.bin"]
    folder = load_intern_repo_tokenized_dataset(root, min_length=4)
    assert folder.type_names == ["a", "a.b", "en", "link", "."]
    assert [(f.rel_path, f.type_id) for f in folder.files][:3] == [("top.bin", 4), ("a/x.bin", 0), ("a/z/w.bin", 0)]
    assert all(f.kept.tolist() == [1] for f in folder.files)  # length 3 < 4 dropped, 8 kept
    assert folder.num_tokens == 8 * len(order)


def test_data_order_path_and_cli(tmp_path):
    root = tmp_path / "train"
    for rel in ["b/1.bin", "a/2.bin", "a/1.bin"]:
        write_bin(root / rel, [[5, 6, 7]])
    out = tmp_path / "order.txt"
    assert cli_main(["data-order", str(root), "-o", str(out)]) == 0
    assert out.read_text().splitlines() == ["a/1.bin", "a/2.bin", "b/1.bin"]
    out.write_text("b/1.bin\n\na/1.bin\n")
    folder = load_intern_repo_tokenized_dataset(root, data_order_path=str(out))
    assert [f.rel_path for f in folder.files] == ["b/1.bin", "a/1.bin"]
    assert [f.type_id for f in folder.files] == [1, 0]


def test_vocab_check_names_file_and_row(tmp_path):
    write_bin(tmp_path / "d" / "a.bin", [[1, 2], [3, -130], [4]])
    folder = load_intern_repo_tokenized_dataset(tmp_path / "d")
    assert folder.max_token_id == 130
    folder.check_vocab_size(131)
    with pytest.raises(EvotuneError, match=r"a\.bin: meta row 1 has token id 130, beyond .* vocabulary of 130"):
        folder.check_vocab_size(130)


# --------------------------------------------------------------------------- errors (issue item 8)


def _error(tmp_path, **kw) -> str:
    with pytest.raises(EvotuneError) as e:
        load_intern_repo_tokenized_dataset(tmp_path / "d", **kw)
    return str(e.value)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_error_line_not_json(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(ftdp, "_CHUNK", chunk)
    lines = [b'{"tokens": [1, 2]}\n', b'{"tokens": [3, 4]}\n', b'{"tokens": [5, 6\n', b'{"tokens": [7]}\n']
    _write_lines(tmp_path / "d" / "a.bin", lines, [2, 2, 2, 1])
    msg = _error(tmp_path)
    assert "a.bin: line 3 (byte offset 38) is not JSON" in msg


@pytest.mark.parametrize("body", [b"[,1]", b"[1,]", b"[-,1]", b"[1 2]", b"[1-2]", b"[--1]", b"[-]", b"[1,,2]",
                                  b"[ ,1]", b"[1.5]", b"[+1]", b"[1, 2 ,]"])
def test_error_malformed_token_list(tmp_path, body):
    lines = [b'{"tokens": [1, 2]}\n', b'{"tokens": ' + body + b"}\n", b'{"tokens": [7]}\n']
    _write_lines(tmp_path / "d" / "a.bin", lines, [2, 2, 1])
    msg = _error(tmp_path)
    assert "a.bin: line 2 (byte offset 19)" in msg
    assert "is not JSON" in msg or "'tokens' must be a list of integers" in msg


def test_error_line_without_tokens(tmp_path):
    _write_lines(tmp_path / "d" / "a.bin", [b'{"tokens": [1]}\n', b'{"input_ids": [1, 2]}\n'], [1, 2])
    assert "a.bin: line 2 (byte offset 16) has no 'tokens' key (found ['input_ids'])" in _error(tmp_path)


def test_error_tokens_not_integers(tmp_path):
    _write_lines(tmp_path / "d" / "a.bin", [b'{"tokens": [1, 2.5]}\n'], [2])
    assert "a.bin: line 1 (byte offset 0): 'tokens' must be a list of integers" in _error(tmp_path)


def test_error_meta_row_past_end(tmp_path):
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1, 2], [3]])
    size = path.stat().st_size
    _write_meta(path, [[0, 2], [size + 10, 1]])
    msg = _error(tmp_path)
    assert f"a.bin.meta: row 1 points at byte {size + 10}, past the end of" in msg and f"({size} bytes)" in msg


def test_error_meta_bin_count_mismatch(tmp_path):
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1, 2], [3], [4, 5, 6]])
    _write_meta(path, [[0, 2], [19, 1]])
    assert "a.bin.meta has 2 rows but" in _error(tmp_path) and "a.bin has 3 lines" in _error(tmp_path)


def test_error_meta_token_count_mismatch(tmp_path):
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1, 2], [3], [4, 5, 6]])
    meta = np.load(open(str(path) + ".meta", "rb"))
    meta[2, 1] = 4
    _write_meta(path, meta)
    assert "a.bin.meta: row 2 says 4 tokens but line 3 of" in _error(tmp_path)


def test_error_meta_offset_inside_a_line(tmp_path):
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1, 2], [3]])
    _write_meta(path, [[0, 2], [5, 1]])
    assert "a.bin.meta: row 1 offset 5 is not the start of a line" in _error(tmp_path)


def test_error_int32_offsets_wrapped(tmp_path):
    """A 2 GiB+ file indexed with int32 offsets, simulated: the wrapped offset is negative."""
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1, 2], [3], [4]])
    wrapped = np.array([2**31 - 100, 2**31 + 50]).astype(np.int64).astype(np.int32)  # -> positive, negative
    _write_meta(path, [[0, 2], [int(wrapped[0]), 1], [int(wrapped[1]), 1]], dtype=np.int32)
    msg = _error(tmp_path)
    assert "a.bin.meta: row 2 has byte offset -2147483598" in msg and "wrapped past 2 GiB" in msg
    assert "int64" in msg


def test_error_missing_meta(tmp_path):
    path = tmp_path / "d" / "a.bin"
    write_bin(path, [[1]])
    os.remove(str(path) + ".meta")
    assert "a.bin.meta is missing" in _error(tmp_path)


def test_error_empty_after_min_length(tmp_path):
    write_bin(tmp_path / "d" / "a.bin", [[1, 2], [3]])
    msg = _error(tmp_path, min_length=5)
    assert "no document has min_length=5 tokens or more (in 1 files)" in msg and str(tmp_path / "d") in msg


def test_error_data_order_names_missing_file(tmp_path):
    write_bin(tmp_path / "d" / "a.bin", [[1, 2]])
    order = tmp_path / "order.txt"
    order.write_text("a.bin\nb.bin\n")
    assert f"{order}: line 2: 'b.bin' does not exist in" in _error(tmp_path, data_order_path=str(order))
    assert "does not exist; write one with 'evotune data-order" in _error(tmp_path, data_order_path="nope.txt")


def test_error_folder_without_data(tmp_path):
    (tmp_path / "d").mkdir()
    assert "has no '*.bin' file" in _error(tmp_path)



DIST_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from evotune.data import ftdp
rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
parsed = []
real = ftdp._parse_bin
ftdp._parse_bin = lambda path, out: parsed.append(path) or real(path, out)
f = ftdp.load_intern_repo_tokenized_dataset(folder)
print(json.dumps({"parsed": len(parsed), "doc": f.files[0].document(1).tolist()}))
dist.destroy_process_group()
"""


def test_distributed_rank0_builds_others_map(tmp_path):
    """Under torch.distributed only rank 0 parses; rank 1 waits at the barrier and maps rank 0's index."""
    import socket
    import subprocess
    import sys

    write_bin(tmp_path / "d" / "a" / "x.bin", [[1, 2], [3, 4, 5]])
    write_bin(tmp_path / "d" / "b" / "y.bin", [[6]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", DIST_SCRIPT, str(rank), str(port), str(tmp_path / "d")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results == [{"parsed": 2, "doc": [3, 4, 5]}, {"parsed": 0, "doc": [3, 4, 5]}]
