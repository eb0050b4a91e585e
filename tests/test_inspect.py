"""evotune inspect: counts per type, supervised targets, marked documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evotune.cli import main as cli_main
from evotune.data import inspect as ins
from evotune.data.ftdp_write import write_bin
from evotune.errors import EvotuneError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INTERNLM2 = SHARED / "tokenizers" / "internlm2.model"

# (document, its targets: positive ids after position 0) worked out by hand
EN_A = [([-1, -5, 6, 7, -2], 2), ([1, 2, 3], 2)]
EN_B = [([4], 0), ([-3, -3, -3], 0)]
CN = [([9, -8, 7, 6, 5, -4], 3)]


@pytest.fixture()
def folder(tmp_path) -> Path:
    write_bin(tmp_path / "en" / "a.bin", [d for d, _ in EN_A])
    write_bin(tmp_path / "en" / "sub" / "b.bin", [d for d, _ in EN_B])
    write_bin(tmp_path / "cn" / "c.bin", [d for d, _ in CN])
    return tmp_path


def test_counts_per_type(folder):
    stats = ins.inspect_path(folder, show=3)
    en, cn = stats.groups["en"], stats.groups["cn"]
    assert (en.files, en.documents, en.tokens, en.supervised, en.no_loss) == (2, 4, 12, 4, 2)
    assert (cn.files, cn.documents, cn.tokens, cn.supervised, cn.no_loss) == (1, 1, 6, 3, 0)
    assert sorted(stats.lengths.tolist()) == [1, 3, 3, 5, 6]
    # walk order: cn/c.bin, en/a.bin, en/sub/b.bin
    assert [(Path(p).name, row, t.tolist()) for p, row, t in stats.shown] == [
        ("c.bin", 0, CN[0][0]), ("a.bin", 0, EN_A[0][0]), ("a.bin", 1, EN_A[1][0])]


def test_supervised_counts_across_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(-50, 50, rng.integers(1, 12)).tolist() for _ in range(60)]
    write_bin(tmp_path / "x.bin", docs)
    monkeypatch.setattr(ins, "_BATCH_TOKENS", 7)
    stats = ins.inspect_path(tmp_path / "x.bin")
    expected = sum(sum(1 for t in d[1:] if t > 0) for d in docs)
    assert stats.total.supervised == expected and stats.total.documents == 60
    assert stats.total.no_loss == sum(1 for d in docs if not any(t > 0 for t in d[1:]))


def test_marked_rendering():
    assert ins.render_document([-1, -5, 6, 7, -2, 3], None, plain=True) == "[[1 5 ]]6 7 [[2 ]]3 "
    # the first token is never a target, even when positive
    assert ins.render_document([1, 2], None, plain=True) == "[[1 ]]2 "
    text = ins.render_document([-1, 6, 0], lambda ids: "<" + ",".join(map(str, ids)) + ">", plain=False)
    assert text.plain == "<1><6><0>"
    assert [(text.plain[s.start:s.end], s.style) for s in text.spans] == [("<1>", "dim"), ("<0>", "dim")]


def test_split_root_groups_train_and_valid(tmp_path):
    write_bin(tmp_path / "train" / "en" / "d" / "a.bin", [[1, 2, 3]])
    write_bin(tmp_path / "valid" / "en" / "d" / "a.bin", [[1, 2]])
    stats = ins.inspect_path(tmp_path)
    assert sorted(stats.groups) == ["train/en", "valid/en"]
    assert stats.groups["valid/en"].tokens == 2


def test_errors(tmp_path):
    with pytest.raises(EvotuneError, match="no such file or folder"):
        ins.inspect_path(tmp_path / "missing")
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(EvotuneError, match="expected a .bin file"):
        ins.inspect_path(tmp_path / "x.jsonl")


@pytest.mark.skipif(not INTERNLM2.is_file(), reason=f"{INTERNLM2} not present")
def test_cli_shows_tokenized_chat_with_untrained_spans_bracketed(tmp_path, capsys):
    src = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}
    src.write_text(json.dumps(record) + "\n" + json.dumps({"text": "plain text"}) + "\n")
    out = tmp_path / "out"
    assert cli_main(["tokenize", str(src), "-o", str(out), "--tokenizer", str(INTERNLM2),
                     "--template", "internlm2_chat"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--tokenizer", str(INTERNLM2), "--show", "2", "--plain"]) == 0
    shown = capsys.readouterr().out
    assert ("[[<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n]]Hello there!<|im_end|>[[\n]]\n"
            in shown)
    assert "[[<s>]]plain text</s>\n" in shown
    assert "train/default" in shown and "p50" in shown
