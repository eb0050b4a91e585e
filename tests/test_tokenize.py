"""evotune tokenize: loss masks, templates, layout, meta, invalid records, workers, streaming."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import numpy as np
import pytest

from evotune.cli import main as cli_main
from evotune.data import templates as T
from evotune.data import tokenize as tk
from evotune.errors import EvotuneError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INTERNLM2 = SHARED / "tokenizers" / "internlm2.model"
needs_internlm2 = pytest.mark.skipif(not INTERNLM2.is_file(), reason=f"{INTERNLM2} not present")
IM_START, IM_END = 92543, 92542

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CHATML_JINJA = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# The published templates (InternLM2-chat, Qwen2-Instruct, Meta-Llama-3-Instruct tokenizer_config.json).
PUBLISHED = {
    "internlm2_chat": (CHATML_JINJA, "<s>"),
    "qwen2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", None),
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}"
               "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
               "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               "<|begin_of_text|>"),
}
END = {"internlm2_chat": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi <|im_end|> there\n"},
    {"role": "assistant", "content": "Hello! 你好 "},
    {"role": "tool", "content": "{\"result\": 42}"},
    {"role": "user", "content": "  more?"},
    {"role": "assistant", "content": "\nSure:\n- a\n- b"},
]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer with the ChatML/Llama-3 special tokens and a ChatML chat_template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["hello world, this is a test of the tokenizer", "user assistant system tool: hi there, sure"] * 5
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[3:])
    tok.chat_template = CHATML_JINJA
    out = tmp_path_factory.mktemp("tok") / "tiny"
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def hf_codec(hf_dir):
    return tk.load_codec(hf_dir)


@pytest.fixture(scope="session")
def sp():
    if not INTERNLM2.is_file():
        pytest.skip(f"{INTERNLM2} not present")
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(INTERNLM2))


def runs(tokens, positive=True):
    """Maximal runs of positive (or non-positive, as absolute ids) tokens."""
    out, cur = [], []
    for t in list(tokens) + [0 if positive else 1]:
        if (t > 0) == positive:
            cur.append(abs(t))
        elif cur:
            out.append(cur)
            cur = []
    return out


def internlm2_text(sp, ids):
    """Decode InternLM2 ids, spelling the chat tokens as ChatML does."""
    names = {1: "<s>", 2: "</s>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
    text, run = "", []
    for i in list(ids) + [None]:
        if i is None or i in names:
            text += sp.decode(run) + names.get(i, "")
            run = []
        else:
            run.append(i)
    return text


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
            f.write(b"\n")
    return path


def read_bin(path) -> list[list[int]]:
    with open(path, "rb") as f:
        return [json.loads(line)["tokens"] for line in f]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".evotune-index" not in p.parts}


# ------------------------------------------------------------------ masking with the real InternLM2 tokenizer


@needs_internlm2
def test_internlm2_chat_loss_exactly_on_assistant_content_and_end(sp):
    enc = tk.RecordEncoder(tk.load_codec(INTERNLM2), tk.Options(template="internlm2_chat")).encode({"messages": CHAT})
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    trained = runs(enc.tokens)
    assert len(trained) == len(replies)
    for run, reply in zip(trained, replies):
        assert run[-1] == IM_END
        assert sp.decode(run[:-1]) == reply
    # everything else is input only, and the whole document is the ChatML text
    chatml = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)
    assert internlm2_text(sp, [abs(t) for t in enc.tokens]) == chatml
    assert enc.tokens[0] == -1 and enc.tokens[-1] == -sp.encode("\n")[0]
    assert [abs(t) for t in enc.tokens].count(IM_END) == len(CHAT)  # the user's typed "<|im_end|>" stayed text
    assert enc.zero_targets == []


def chatml_reference(sp, text):
    """Encode a ChatML text as a tokenizer with the chat tokens as added tokens does: split at them, encode between."""
    ids = []
    for part in re.split(r"(<s>|<\|im_start\|>|<\|im_end\|>)", text):
        ids += {"<s>": [1], "<|im_start|>": [IM_START], "<|im_end|>": [IM_END]}.get(part) or sp.encode(part)
    return ids


@needs_internlm2
def test_internlm2_segments_equal_template_text_encoding_except_at_merging_boundaries(sp):
    encoder = tk.RecordEncoder(tk.load_codec(INTERNLM2), tk.Options(template="internlm2_chat"))
    ordinary = [{"role": "user", "content": "What is 2+2? Answer briefly."},
                {"role": "assistant", "content": "4. 你好, world!"}]
    text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ordinary)
    assert [abs(t) for t in encoder.encode({"messages": ordinary}).tokens] == chatml_reference(sp, text)
    # documented difference: a reply starting with "\n" would merge with the header's "\n" in the whole text
    leading = [ordinary[0], {"role": "assistant", "content": "\n4"}]
    text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in leading)
    segmented = [abs(t) for t in encoder.encode({"messages": leading}).tokens]
    whole = chatml_reference(sp, text)
    assert segmented != whole and internlm2_text(sp, segmented) == internlm2_text(sp, whole)


@needs_internlm2
def test_text_record_is_bos_tokens_eos_all_positive(sp):
    enc = tk.RecordEncoder(tk.load_codec(INTERNLM2), tk.Options()).encode({"text": "Hello world.\n\n你好"})
    assert enc.tokens == [1, *sp.encode("Hello world.\n\n你好"), 2]
    assert tk.count_supervised(enc.tokens) == len(enc.tokens) - 1


@needs_internlm2
def test_template_needing_unknown_special_tokens_is_fatal():
    with pytest.raises(EvotuneError, match=r"llama3 needs the special tokens <\|begin_of_text\|>"):
        tk.RecordEncoder(tk.load_codec(INTERNLM2), tk.Options(template="llama3"))
    with pytest.raises(EvotuneError, match="--format chat needs --template"):
        tk.RecordEncoder(tk.load_codec(INTERNLM2), tk.Options(fmt="chat"))


# ------------------------------------------------------------------ templates with a tokenizer built here


@pytest.mark.parametrize("name", sorted(T.TEMPLATES))
def test_named_templates_render_the_published_text_and_mask_replies(name, hf_codec):
    jinja, bos = PUBLISHED[name]
    expected = jinja2.Environment().from_string(jinja).render(messages=CHAT, bos_token=bos,
                                                                add_generation_prompt=False)
    pieces = T.TEMPLATES[name].render(CHAT)
    assert "".join(p.text for p in pieces) == expected
    enc = tk.RecordEncoder(hf_codec, tk.Options(template=name)).encode({"messages": CHAT})
    decode = hf_codec.tok.decode
    assert decode([abs(t) for t in enc.tokens]) == expected
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    if name == "llama3":
        replies = [r.strip() for r in replies]
    assert [decode(run) for run in runs(enc.tokens)] == [r + END[name] for r in replies]
    # on an ordinary conversation the pieces give what the whole rendered text encodes to
    ordinary = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, sure."}]
    text = jinja2.Environment().from_string(jinja).render(messages=ordinary, bos_token=bos)
    whole = hf_codec.tok(text, add_special_tokens=False)["input_ids"]
    assert [abs(t) for t in tk.RecordEncoder(hf_codec, tk.Options(template=name)).encode(
        {"messages": ordinary}).tokens] == whole


def test_tokenizer_chat_template_masks_replies_and_matches_apply_chat_template(hf_codec):
    encoder = tk.RecordEncoder(hf_codec, tk.Options())  # no --template: the tokenizer's own
    assert encoder.template_name == T.TOKENIZER_TEMPLATE
    enc = encoder.encode({"messages": CHAT})
    tok = hf_codec.tok
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert [tok.decode(run) for run in runs(enc.tokens)] == [r + "<|im_end|>" for r in replies]
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode([abs(t) for t in enc.tokens]) == text
    ordinary = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, sure"}]
    expected = tok(tok.apply_chat_template(ordinary, tokenize=False), add_special_tokens=False)["input_ids"]
    assert [abs(t) for t in encoder.encode({"messages": ordinary}).tokens] == expected


def test_chat_template_that_rewrites_earlier_turns_is_a_record_error(hf_codec):
    # keeps only the last user message, as some reasoning-model templates drop earlier content
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' or loop.last %}"
                 "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")

    def render(messages, add_generation_prompt):
        return hf_codec.tok.apply_chat_template(messages, tokenize=False, chat_template=rewriting)

    with pytest.raises(T.RecordError, match="without the text of"):
        T.render_with_chat_template(CHAT[1:3] + CHAT[4:], render, hf_codec.special_tokens)


def test_zero_id_in_a_trained_span_is_counted(tmp_path, capsys):
    class Codec:  # 'z' is token id 0
        path, bos_id, eos_id, chat_template = "stub", 5, 6, None

        def encode_text(self, texts):
            return [[0 if c == "z" else 7 for c in t] for t in texts]

    stats = tk.TokenizeStats()
    encoder = tk.RecordEncoder(Codec(), tk.Options())
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "azz"}, {"text": "a"}])
    job = tk.plan_jobs([src], tmp_path / "out")[0]
    stats.add(tk.tokenize_file(job, encoder))
    assert read_bin(job.outputs[0]) == [[5, 7, 0, 0, 6], [5, 7, 6]]
    assert stats.zero_targets == 2
    assert "warning: 2 trained tokens have id 0" in tk.format_summary(stats)


# ------------------------------------------------------------------ files: layout, meta, errors, workers


def text_records(n, seed=0, prefix="doc"):
    rng = np.random.default_rng(seed)
    words = ["hello", "world", "this", "is", "a", "test", "of", "tokenizer", "sure", "there"]
    return [{"text": f"{prefix} {i}: " + " ".join(rng.choice(words, rng.integers(1, 30)))} for i in range(n)]


def chat_records(n, seed=1):
    rng = np.random.default_rng(seed)
    words = ["hi", "there", "sure", "hello", "world", "test"]
    return [{"messages": [{"role": "user", "content": f"q{i} " + " ".join(rng.choice(words, 5))},
                          {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 12)))}]}
            for i in range(n)]


def test_layout_mirrors_inputs_and_meta_matches_lines(tmp_path, hf_dir):
    raw = tmp_path / "raw"
    write_jsonl(raw / "en" / "wiki" / "part1.jsonl", text_records(5))
    write_jsonl(raw / "en" / "news.jsonl", text_records(4, seed=2))
    write_jsonl(raw / "misc.json", text_records(3, seed=3))
    write_jsonl(raw / ".hidden" / "x.jsonl", text_records(3))
    write_jsonl(tmp_path / "chat.jsonl", chat_records(6))
    out = tmp_path / "out"
    stats = tk.tokenize_files([raw], out, hf_dir, progress=False)
    tk.tokenize_files([tmp_path / "chat.jsonl"], out, hf_dir, type_name="sft", progress=False)
    bins = sorted(str(p.relative_to(out)) for p in out.rglob("*.bin"))
    assert bins == ["train/default/misc/misc.bin", "train/en/news/news.bin", "train/en/wiki/part1.bin",
                    "train/sft/chat/chat.bin"]
    assert stats.docs["train"] == 12 and stats.files == 3
    for rel in bins:
        data = (out / rel).read_bytes()
        lines = data.splitlines(keepends=True)
        meta = np.load(out / (rel + ".meta"))
        assert meta.dtype == np.int64 and meta.shape == (len(lines), 2)
        assert meta[:, 0].tolist() == np.cumsum([0] + [len(x) for x in lines[:-1]]).tolist()
        assert meta[:, 1].tolist() == [len(json.loads(x)["tokens"]) for x in lines]
    # round trip: training's reader sees the same documents, with the types of the layout
    from evotune import load_intern_repo_tokenized_dataset

    folder = load_intern_repo_tokenized_dataset(str(out / "train"))
    assert folder.type_names == ["default", "en", "sft"]
    assert [f.rel_path for f in folder.files] == [b[len("train/"):] for b in bins]
    for f, rel in zip(folder.files, bins):
        assert [f.document(r).tolist() for r in range(len(f.lengths))] == read_bin(out / rel)


def test_layout_collisions_and_existing_outputs_are_errors(tmp_path, hf_dir):
    a = write_jsonl(tmp_path / "a" / "x.jsonl", text_records(2))
    b = write_jsonl(tmp_path / "b" / "x.json", text_records(2))
    with pytest.raises(EvotuneError, match="would both be written to default/x/x.bin"):
        tk.plan_jobs([a, b], tmp_path / "out")
    tk.tokenize_files([a], tmp_path / "out", hf_dir, progress=False)
    with pytest.raises(EvotuneError, match="pass --overwrite"):
        tk.tokenize_files([a], tmp_path / "out", hf_dir, progress=False)
    tk.tokenize_files([b], tmp_path / "out", hf_dir, overwrite=True, progress=False)


BAD = [
    {"text": "fine"},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": []},
    {"other": 1},
    {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    b'{"text": "caf\xe9"}',
    b'{"text": "unclosed',
    b"",
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]},
]
BAD_REASONS = [(2, "no assistant message"), (3, "'messages' is empty"), (4, "neither 'messages' nor 'text'"),
               (5, "messages[0] has role 'bot'"), (6, "not UTF-8 (byte 0xe9 at column 14)"), (7, "bad JSON")]


def test_invalid_records_are_reported_with_file_and_line_and_skipped_or_fatal(tmp_path, hf_dir):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    stats = tk.tokenize_files([src], tmp_path / "out", hf_dir, progress=False)
    assert stats.invalid == 6 and stats.records == 8 and stats.docs["train"] == 2
    assert [(p, line) for p, line, _ in stats.errors] == [(str(src), line) for line, _ in BAD_REASONS[:5]]
    for (_, _, reason), (_, expected) in zip(stats.errors, BAD_REASONS):
        assert expected in reason
    assert "skipped 6 invalid records; the first 5:" in tk.format_summary(stats)
    with pytest.raises(EvotuneError, match=re.escape(f"{src}:2: no assistant message")):
        tk.tokenize_files([src], tmp_path / "out2", hf_dir, on_error="fail", progress=False)
    assert [p for p in (tmp_path / "out2").rglob("*") if p.is_file()] == []  # no partial output left


def test_cli_reports_counts_and_fails_with_one_line(tmp_path, hf_dir, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    assert cli_main(["tokenize", str(src), "-o", str(tmp_path / "o"), "--tokenizer", hf_dir]) == 0
    out = capsys.readouterr().out
    assert "train: 2 documents" in out and f"  {src}:6: not UTF-8" in out and ":7:" not in out
    good = write_jsonl(tmp_path / "good.jsonl", text_records(3000))  # the pool fails while this one runs
    assert cli_main(["tokenize", str(src), str(good), "-o", str(tmp_path / "p"), "--tokenizer", hf_dir,
                     "--on-error", "fail", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert f"evotune: error: {src}:2: no assistant message" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "p").rglob("*") if p.is_file() and "partial" in p.name] == []


def test_workers_give_byte_identical_output(tmp_path, hf_dir):
    raw = tmp_path / "raw"
    write_jsonl(raw / "en" / "a.jsonl", text_records(300, seed=4))
    write_jsonl(raw / "en" / "b.jsonl", chat_records(200, seed=5) + [{"messages": []}])
    write_jsonl(raw / "cn" / "c.jsonl", text_records(50, seed=6) + chat_records(50, seed=7))
    kw = dict(valid_ratio=0.25, max_length=24, progress=False)
    s1 = tk.tokenize_files([raw], tmp_path / "w1", hf_dir, workers=1, **kw)
    s2 = tk.tokenize_files([raw], tmp_path / "w2", hf_dir, workers=2, **kw)
    t1, t2 = tree(tmp_path / "w1"), tree(tmp_path / "w2")
    assert t1 == t2
    assert "valid/en/a/a.bin" in t1 and "train/cn/c/c.bin.meta" in t1
    assert (s1.docs, s1.invalid, s1.split, s1.truncated) == (s2.docs, s2.invalid, s2.split, s2.truncated)
    assert s1.invalid == 1 and s1.split > 0 and s1.truncated > 0


def test_valid_split_is_by_record_content(tmp_path, hf_dir):
    records = text_records(400, seed=8)
    dup = {"text": "the same record"}
    src = write_jsonl(tmp_path / "a.jsonl", records[:200] + [dup] * 20 + records[200:])
    stats = tk.tokenize_files([src], tmp_path / "out", hf_dir, valid_ratio=0.3, progress=False)
    train = read_bin(tmp_path / "out/train/default/a/a.bin")
    valid = read_bin(tmp_path / "out/valid/default/a/a.bin")
    assert len(train) + len(valid) == 420 == stats.docs["train"] + stats.docs["valid"]
    dup_tokens = tk.RecordEncoder(tk.load_codec(hf_dir), tk.Options()).encode(dup).tokens
    assert train.count(dup_tokens) in (0, 20) and valid.count(dup_tokens) == 20 - train.count(dup_tokens)
    assert 0.22 < (len(valid) - valid.count(dup_tokens)) / 400 < 0.38


@needs_internlm2
def test_max_length_split_truncate_and_round_trip_through_the_loader(tmp_path, sp):
    from evotune import load_intern_repo_tokenized_dataset

    long_text = "one two three four five six seven eight nine ten " * 4
    chat = {"messages": [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "late"}]}
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": long_text}, {"text": "short"}, chat])
    full = [1, *sp.encode(long_text), 2]
    stats = tk.tokenize_files([src], tmp_path / "split", INTERNLM2, template="internlm2_chat", max_length=16,
                             progress=False)
    docs = read_bin(tmp_path / "split/train/default/a/a.bin")
    n_pieces = -(-len(full) // 16)
    assert [len(d) for d in docs[:n_pieces]] == [16] * (n_pieces - 1) + [len(full) - 16 * (n_pieces - 1)]
    assert sum(docs[:n_pieces], []) == full and docs[n_pieces] == [1, *sp.encode("short"), 2]
    assert stats.split == 1 and stats.no_loss == 1 and len(docs) == n_pieces + 1  # the chat reply was cut off
    tk.tokenize_files([src], tmp_path / "trunc", INTERNLM2, template="internlm2_chat", max_length=16,
                      overflow="truncate", progress=False)
    assert read_bin(tmp_path / "trunc/train/default/a/a.bin")[0] == full[:16]
    folder = load_intern_repo_tokenized_dataset(str(tmp_path / "split" / "train"))
    (f,) = folder.files
    assert folder.type_names == ["default"]
    assert [f.document(r).tolist() for r in range(len(f.lengths))] == docs


# ------------------------------------------------------------------ .json arrays, streamed


def test_json_array_is_streamed_across_chunk_boundaries(tmp_path, monkeypatch):
    records = [{"text": "a ] } \" \\ [ {"}, {"text": "ünïcödé 你好 😀"}, 12345, {"messages": [{"role": "user"}]},
               {"text": "x" * 50}]
    path = tmp_path / "a.json"
    text = json.dumps(records, indent=2, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(tk._JsonArray, "_CHUNK", 7)
    got = list(tk.iter_records(str(path)))
    assert [r.value for r in got] == records and all(r.error is None for r in got)
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if re.match(r"  [{1]", line)]
    assert [r.line for r in got] == starts
    assert [json.loads(r.raw) for r in got] == records


def test_json_array_errors_end_the_file_with_its_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"text": "a"},\n {"text": "b" "c"},\n {"text": "d"}]')
    got = list(tk.iter_records(str(path)))
    assert [r.value for r in got[:1]] == [{"text": "a"}]
    assert got[1].line == 2 and got[1].error.startswith("bad JSON") and len(got) == 2
    path.write_bytes(b'[{"text": "a"},\n\n {"text": "caf\xe9"}]')
    got = list(tk.iter_records(str(path)))
    assert got[1].line == 3 and got[1].error.startswith("not UTF-8") and len(got) == 2
    path.write_bytes(b'[{"text": "a"}] trailing')
    assert list(tk.iter_records(str(path)))[-1].error == "text after the array's closing ']'"
