"""``evotune tokenize``: raw text / chat JSON lines -> an InternEvo tokenized folder.

Each input file becomes one ``.bin`` + ``.bin.meta`` pair per split, written by
one worker from start to end, so the output does not depend on ``--workers``.
Inputs are streamed record by record; a worker holds one record and two
integers per written document. Rules (layout, masking, overflow, split,
invalid records) are in docs/data-preparation.md.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evotune.data import templates as T
from evotune.data import xtuner_maps as X
from evotune.data.ftdp_write import BinWriter
from evotune.errors import EvotuneError

FORMATS = ("auto", "text", "chat")
OVERFLOW = ("truncate", "split")
SPLITS = ("train", "valid")
INPUT_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_ERRORS = 5

# ---------------------------------------------------------------- tokenizers


class SentencePieceCodec:
    """A sentencepiece ``.model`` used directly (several times faster than a transformers wrapper).

    The bare InternLM2 model names its chat tokens ``[UNUSED_TOKEN_146]`` etc.;
    the ``<|...|>`` spellings its chat models use are mapped to those ids.
    """

    _INTERNLM2_ALIASES = {  # spelling: (id, the piece's name in the bare model)
        "<|im_start|>": (92543, "[UNUSED_TOKEN_146]"),
        "<|im_end|>": (92542, "[UNUSED_TOKEN_145]"),
        "<|action_start|>": (92541, "[UNUSED_TOKEN_144]"),
        "<|action_end|>": (92540, "[UNUSED_TOKEN_143]"),
        "<|interpreter|>": (92539, "[UNUSED_TOKEN_142]"),
        "<|plugin|>": (92538, "[UNUSED_TOKEN_141]"),
    }

    def __init__(self, path: str):
        import sentencepiece

        self.path = path
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise EvotuneError(f"{path}: not a readable sentencepiece model ({e})") from e
        size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.chat_template = None
        self._names = {i: self.sp.id_to_piece(i) for i in range(size)
                       if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._aliases = {name: i for name, (i, piece) in self._INTERNLM2_ALIASES.items()
                         if i < size and self.sp.id_to_piece(i) == piece}
        self._names.update({i: name for name, i in self._aliases.items()})

    def token_id(self, spelling: str) -> int | None:
        if spelling in self._aliases:
            return self._aliases[spelling]
        i = self.sp.piece_to_id(spelling)
        return i if self.sp.id_to_piece(i) == spelling else None

    def encode_text(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1) if texts else []

    encode_markup = encode_text  # sentencepiece has no special-token parsing

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._names or not 0 <= i < self.sp.get_piece_size():
                out.append(self.sp.decode(run))
                run = []
                out.append(self._names.get(i, f"<id {i}>"))
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


class HFCodec:
    """A Hugging Face tokenizer (from :func:`evotune.model.load.load_tokenizer`).

    Plain text is encoded with ``split_special_tokens=True`` (a ``<|im_end|>``
    typed by a user stays text); template markup parses special tokens.
    """

    def __init__(self, tok, path: str):
        self.tok = tok
        self.path = path
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.chat_template = tok.chat_template or None
        self._vocab = tok.get_vocab()
        specials = set(tok.all_special_tokens)
        specials.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
        self.special_tokens = sorted(specials)

    def token_id(self, spelling: str) -> int | None:
        return self._vocab.get(spelling)

    def encode_text(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []

    def encode_markup(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def load_codec(path: str | os.PathLike) -> SentencePieceCodec | HFCodec:
    """The tokenizer at ``path``: a sentencepiece ``.model`` file, or whatever ``load_tokenizer`` reads."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return SentencePieceCodec(path)
    from evotune.model.load import load_tokenizer

    tok = load_tokenizer(path)
    if tok is None:
        raise EvotuneError(f"--tokenizer {path}: the folder holds no tokenizer files")
    return HFCodec(tok, path)


# ---------------------------------------------------------------- records -> signed token ids


@dataclass(frozen=True)
class Options:
    fmt: str = "auto"
    template: str | None = None
    text_key: str = "text"
    max_length: int | None = None
    overflow: str | None = None  # None: split text, truncate chat
    valid_ratio: float = 0.0
    on_error: str = "skip"
    map_fn: str | None = None  # an XTuner dataset map function's name: every record goes through it


@dataclass
class Encoded:
    tokens: list[int]  # negative = input only
    kind: str  # "text" or "chat"
    zero_targets: list[int]  # positions of trained tokens whose id is 0 (InternEvo cannot train them)


class RecordEncoder:
    """Turns one JSON record into signed token ids; checks the tokenizer/template pair once."""

    def __init__(self, codec, options: Options):
        self.codec = codec
        self.options = options
        name = options.template
        if name is None and codec.chat_template:
            name = T.TOKENIZER_TEMPLATE
        if name == T.TOKENIZER_TEMPLATE and not codec.chat_template:
            raise EvotuneError(f"--template tokenizer: {codec.path} has no chat_template; "
                               f"choose one of {', '.join(T.TEMPLATES)}")
        if name not in (None, T.TOKENIZER_TEMPLATE, *T.TEMPLATES, *T.PROMPT_TEMPLATE):
            raise EvotuneError(f"--template {name}: unknown; choose one of {', '.join(template_names())}")
        if name is None and options.fmt == "chat" and options.map_fn is None:
            raise EvotuneError(f"--format chat needs --template ({', '.join(T.TEMPLATES)}): "
                               f"{codec.path} has no chat_template")
        self.template_name = name
        self._xtuner: _XTunerRecords | None = None  # made for the first XTuner-format record
        self._specials: dict[str, int] = {}
        if name in T.TEMPLATES:
            missing = []
            for spelling in T.TEMPLATES[name].special_tokens:
                i = codec.token_id(spelling)
                if i is None:
                    missing.append(spelling)
                self._specials[spelling] = i
            if missing:
                raise EvotuneError(f"--template {name} needs the special tokens {', '.join(missing)}, "
                                   f"which the tokenizer {codec.path} does not have; choose another template")
        if codec.eos_id is None and options.fmt != "chat":
            raise EvotuneError(f"tokenizer {codec.path} has no EOS token, which text documents end with")

    def encode(self, record) -> Encoded:
        if not isinstance(record, dict):
            raise T.RecordError(f"the record is {T.json_type(record)}, expected an object")
        fmt = self.options.fmt
        key = self.options.text_key
        if fmt != "text" and (self.options.map_fn is not None or "conversation" in record or (
                "messages" in record and self.template_name not in (None, T.TOKENIZER_TEMPLATE, *T.TEMPLATES))):
            if self._xtuner is None:
                self._xtuner = _XTunerRecords(self.codec, self.options, self.template_name)
            return self._xtuner.encode(record)
        if fmt == "auto":
            fmt = "chat" if "messages" in record else "text" if key in record else None
            if fmt is None:
                raise T.RecordError(f"the record has neither 'messages' nor {key!r}")
        if fmt == "text":
            return self._encode_text(record)
        if "messages" not in record:
            raise T.RecordError("the record has no 'messages'")
        return self._encode_chat(record["messages"])

    def _encode_text(self, record: dict) -> Encoded:
        key = self.options.text_key
        if key not in record:
            raise T.RecordError(f"the record has no {key!r}")
        text = record[key]
        if not isinstance(text, str):
            raise T.RecordError(f"{key!r} is {T.json_type(text)}, expected a string")
        if not text:
            raise T.RecordError(f"{key!r} is empty")
        body = self.codec.encode_text([text])[0]
        bos = [self.codec.bos_id] if self.codec.bos_id is not None else []
        tokens = bos + body + [self.codec.eos_id]
        return Encoded(tokens, "text", [i for i, t in enumerate(tokens) if t == 0] if 0 in tokens else [])

    def _encode_chat(self, messages) -> Encoded:
        if self.template_name is None:
            raise EvotuneError(f"chat records need --template ({', '.join(T.TEMPLATES)}): "
                               f"the tokenizer {self.codec.path} has no chat_template")
        if self.template_name == T.TOKENIZER_TEMPLATE:
            pieces = T.render_with_chat_template(messages, self.codec.render_chat, self.codec.special_tokens)
        else:
            pieces = T.TEMPLATES[self.template_name].render(messages)
        return self._encode_pieces(pieces)

    def _encode_pieces(self, pieces: list[T.Piece]) -> Encoded:
        ids: list[list[int] | None] = [None] * len(pieces)
        for kind, encode in ((T.TEXT, self.codec.encode_text), (T.MARKUP, self.codec.encode_markup)):
            index = [i for i, p in enumerate(pieces) if p.kind == kind]
            for i, piece_ids in zip(index, encode([pieces[i].text for i in index])):
                ids[i] = piece_ids
        tokens: list[int] = []
        zeros: list[int] = []
        for piece, piece_ids in zip(pieces, ids):
            if piece.kind == T.SPECIAL:
                i = self._specials.get(piece.text)
                i = self.codec.token_id(piece.text) if i is None else i
                if i is None:
                    raise T.RecordError(f"the template uses {piece.text!r}, which the tokenizer does not have")
                piece_ids = [i]
            if piece.trained:
                zeros += [len(tokens) + j for j, t in enumerate(piece_ids) if t == 0]
                tokens += piece_ids
            else:
                tokens += [-t for t in piece_ids]
        return Encoded(tokens, "chat", zeros)


def template_names() -> list[str]:
    """``--template`` values: evotune's chat templates, XTuner's prompt templates, the tokenizer's own."""
    return list(dict.fromkeys([*T.TEMPLATES, *T.PROMPT_TEMPLATE, T.TOKENIZER_TEMPLATE]))


class _SpecialSplitter:
    """For a bare sentencepiece model (no special-token parsing): the template's special-token spellings
    the model knows (``<|im_start|>`` ...) become their ids, the text between them is encoded on its own,
    as InternLM2's tokenizer splits text on its special tokens."""

    def __init__(self, codec: SentencePieceCodec, template: dict):
        text = "".join(v if isinstance(v, str) else "".join(v) for v in template.values() if isinstance(v, (str, list)))
        self.ids = {sp: codec.token_id(sp) for sp in set(re.findall(r"<[^<>\s]+>", text))}
        self.ids = {sp: i for sp, i in self.ids.items() if i is not None}
        self.pattern = re.compile("(" + "|".join(map(re.escape, sorted(self.ids, key=len, reverse=True))) + ")") \
            if self.ids else None
        self.codec = codec

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.pattern is None:
            return self.codec.encode_text(texts)
        out = []
        for text in texts:
            parts = [p for p in self.pattern.split(text) if p]
            plain = self.codec.encode_text([p for p in parts if p not in self.ids])
            ids: list[int] = []
            for part in parts:
                ids += [self.ids[part]] if part in self.ids else plain.pop(0)
            out.append(ids)
        return out


class _XTunerRecords:
    """XTuner's formats (evotune/data/xtuner_maps.py): ``conversation`` records, records of an XTuner
    dataset map function (``--map-fn``), and ``messages`` under an XTuner-only template (through
    ``openai_map_fn``, as XTuner reads them). ``--template`` names the XTuner template (none: untemplated,
    as XTuner's ``template_map_fn=None``); the loss is XTuner's rule."""

    def __init__(self, codec, options: Options, template: str | None):
        self.map_fn = X.dataset_map_fn_of(options.map_fn) if options.map_fn else None
        self.template_name = template
        self.template = X.template_map_fn_factory(template) if template in T.PROMPT_TEMPLATE else None
        # XTuner's tokenizer.encode: special-token spellings in the text are special tokens
        self.encode_text = codec.encode_markup
        if isinstance(codec, SentencePieceCodec) and template in T.PROMPT_TEMPLATE:
            self.encode_text = _SpecialSplitter(codec, T.PROMPT_TEMPLATE[template]).encode
        tok = getattr(codec, "tok", None)
        self.bos = X.turn_bos(type(tok).__name__ if tok is not None else "", codec.bos_id)
        self.eos = [codec.eos_id] if codec.eos_id is not None else []

    def encode(self, record) -> Encoded:
        if self.template_name not in (None, *T.PROMPT_TEMPLATE):
            raise T.RecordError(f"XTuner records need one of XTuner's templates as --template "
                                f"({', '.join(T.PROMPT_TEMPLATE)}) or none, not {self.template_name}")
        if not self.eos:
            raise T.RecordError("the tokenizer has no EOS token, which XTuner's turns end with")
        map_fn = self.map_fn
        if map_fn is None and "conversation" not in record and "messages" in record:
            map_fn = X.openai_map_fn
        try:
            tokens = X.record_tokens(record, self.encode_text, self.bos, self.eos, None, map_fn, self.template)
        except KeyError as e:
            raise T.RecordError(f"no field {e.args[0]!r}" + (f" ({map_fn.__name__} reads it)" if map_fn else ""))
        if tokens is None:
            raise T.RecordError("no turn left after the map function (XTuner drops such records)")
        return Encoded(tokens, "chat", [i for i, t in enumerate(tokens) if t == 0 and i])


def count_supervised(tokens: Sequence[int]) -> int:
    """Targets InternEvo trains on in one document: positive ids after its first position."""
    return sum(1 for t in tokens[1:] if t > 0)


def fit_length(tokens: list[int], max_length: int | None, overflow: str) -> list[tuple[int, int]]:
    """(start, end) of the documents a too-long document becomes."""
    n = len(tokens)
    if max_length is None or n <= max_length:
        return [(0, n)]
    if overflow == "truncate":
        return [(0, max_length)]
    return [(s, min(s + max_length, n)) for s in range(0, n, max_length)]


def in_valid_split(raw: bytes, ratio: float) -> bool:
    """Content hash -> split: identical records share a split, whatever the file order or worker count."""
    if ratio <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"evotune-split").digest(), "big")
    return h < ratio * 2.0**64


# ---------------------------------------------------------------- reading inputs


@dataclass
class Record:
    line: int
    raw: bytes = b""
    value: object = None
    error: str | None = None
    pos: int = 0  # bytes of the file read so far (progress)


def iter_records(path: str) -> Iterator[Record]:
    """Records of a JSON-lines file, or of a ``.json`` file holding one JSON array (streamed).

    Problems come back as records with ``error`` set. Blank lines are no
    records. In a JSON array a syntax or UTF-8 error ends the file (the
    records after it cannot be found), reported as one invalid record.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if path.endswith(".json") and head.startswith(b"["):
            yield from _JsonArray(f)
        else:
            yield from _iter_jsonl(f)


def _iter_jsonl(f) -> Iterator[Record]:
    pos = 0
    for line_no, raw in enumerate(f, 1):
        pos += len(raw)
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.strip()
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(line_no, raw, error=f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})", pos=pos)
            continue
        try:
            yield Record(line_no, raw, json.loads(text), pos=pos)
        except json.JSONDecodeError as e:
            yield Record(line_no, raw, error=f"bad JSON ({e.msg} at column {e.colno})", pos=pos)


class _Unreadable(Exception):
    def __init__(self, line: int, message: str):
        self.line, self.message = line, message


class _JsonArray:
    """Stream the elements of ``[ {...}, {...} ]`` with a bounded window of decoded text."""

    _CHUNK = 1 << 20
    _FRAGMENT = re.compile(r"[^\s,\]}]*")  # a token that more input could still complete

    def __init__(self, f):
        self.f = f
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof, self.bytes_read = "", 0, False, 0
        self.tail = b""  # bytes of a character cut by the chunk end
        self.error: _Unreadable | None = None  # raised once the text before it is used up
        self.line, self.line_pos = 1, 0  # line number at buf[line_pos]

    def _more(self) -> bool:
        if self.error is not None:
            raise self.error
        if self.eof:
            return False
        chunk = self.f.read(max(self._CHUNK, len(self.buf)))
        if not self.bytes_read and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8):]
        self.bytes_read += len(chunk)
        self.eof = not chunk
        data, self.tail = self.tail + chunk, b""
        try:
            self.buf += data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.buf += data[: e.start].decode("utf-8")
            if e.reason == "unexpected end of data" and not self.eof:
                self.tail = data[e.start:]
            else:
                line = self.line + self.buf.count("\n", self.line_pos)
                self.error = _Unreadable(line, f"not UTF-8 (byte {data[e.start]:#04x}); the rest of the file "
                                               "is not read")
        return True

    def _line_at(self, pos: int) -> int:
        self.line += self.buf.count("\n", self.line_pos, pos)
        self.line_pos = pos
        return self.line

    def _next_char(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos: self.pos + 1]

    def _value(self):
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    return value, end
            except json.JSONDecodeError as e:
                truncated = e.msg.startswith("Unterminated string") or self._FRAGMENT.fullmatch(self.buf, e.pos)
                if not truncated or (self.eof and self.error is None):
                    raise _Unreadable(self._line_at(e.pos), f"bad JSON ({e.msg}); the rest of the file is not read")
            self._more()

    def __iter__(self) -> Iterator[Record]:
        try:
            self._next_char()
            self.pos += 1  # '['
            first = True
            while True:
                c = self._next_char()
                if c == "]":
                    self.pos += 1
                    if self._next_char():
                        raise _Unreadable(self._line_at(self.pos), "text after the array's closing ']'")
                    return
                if not first:
                    if c != ",":
                        raise _Unreadable(self._line_at(self.pos), f"bad JSON (expected ',' or ']', found {c!r})")
                    self.pos += 1
                    c = self._next_char()
                if not c:
                    raise _Unreadable(self._line_at(self.pos), "bad JSON (the file ends inside the array)")
                first = False
                line = self._line_at(self.pos)
                value, end = self._value()
                raw = self.buf[self.pos: end].encode()
                self.pos = end
                yield Record(line, raw, value, pos=self.bytes_read)
                if self.pos > self._CHUNK:
                    self._line_at(self.pos)
                    self.buf, self.pos, self.line_pos = self.buf[self.pos:], 0, 0
        except _Unreadable as e:
            yield Record(e.line, error=e.message, pos=self.bytes_read)


# ---------------------------------------------------------------- one input file


@dataclass(frozen=True)
class Job:
    source: str
    outputs: tuple[str, str]  # train and valid .bin paths


@dataclass
class TokenizeStats:
    files: int = 0
    records: int = 0
    invalid: int = 0
    errors: list[tuple[str, int, str]] = field(default_factory=list)  # the first few (file, line, reason)
    truncated: int = 0
    split: int = 0
    no_loss: int = 0
    zero_targets: int = 0
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    supervised: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    written: list[str] = field(default_factory=list)

    def add(self, other: "TokenizeStats") -> None:
        for name in ("files", "records", "invalid", "truncated", "split", "no_loss", "zero_targets"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors[: MAX_REPORTED_ERRORS - len(self.errors)]
        for name in ("docs", "tokens", "supervised"):
            for split in SPLITS:
                getattr(self, name)[split] += getattr(other, name)[split]
        self.written += other.written


def _partial(path: str) -> str:
    return path + ".partial"


def tokenize_file(job: Job, encoder: RecordEncoder, report: Callable[[int, int], None] | None = None
                  ) -> TokenizeStats:
    """Tokenize one input file into its train/valid ``.bin`` pairs (written as ``.partial``, renamed at the end)."""
    opts = encoder.options
    stats = TokenizeStats(files=1)
    writers: dict[int, BinWriter] = {}
    docs = 0
    try:
        for rec in iter_records(job.source):
            stats.records += 1
            if rec.error is None:
                try:
                    enc = encoder.encode(rec.value)
                except T.RecordError as e:
                    rec.error = str(e)
            if rec.error is not None:
                stats.invalid += 1
                if opts.on_error == "fail":
                    raise EvotuneError(f"{job.source}:{rec.line}: {rec.error} (fix the record, "
                                       "or pass --on-error skip to skip invalid records)")
                if len(stats.errors) < MAX_REPORTED_ERRORS:
                    stats.errors.append((job.source, rec.line, rec.error))
                continue
            overflow = opts.overflow or ("split" if enc.kind == "text" else "truncate")
            spans = fit_length(enc.tokens, opts.max_length, overflow)
            if spans[-1][1] < len(enc.tokens):
                stats.truncated += 1
            elif len(spans) > 1:
                stats.split += 1
            split = int(in_valid_split(rec.raw, opts.valid_ratio))
            for start, end in spans:
                doc = enc.tokens[start:end]
                supervised = count_supervised(doc)
                if supervised == 0:
                    stats.no_loss += 1
                    continue
                if split not in writers:
                    writers[split] = BinWriter(_partial(job.outputs[split]))
                writers[split].write(doc)
                stats.docs[SPLITS[split]] += 1
                stats.tokens[SPLITS[split]] += len(doc)
                stats.supervised[SPLITS[split]] += supervised
                stats.zero_targets += sum(1 for p in enc.zero_targets if start < p < end)
                docs += 1
            if report is not None and stats.records % 1000 == 0:
                report(rec.pos, docs)
        for split, writer in writers.items():
            writer.close()
            final = job.outputs[split]
            os.replace(_partial(final) + ".meta", final + ".meta")
            os.replace(_partial(final), final)
            stats.written.append(final)
    except BaseException:
        for writer in writers.values():
            writer.close()
        _remove_partials(job)
        raise
    if report is not None:
        report(os.path.getsize(job.source), docs)
    return stats


def _remove_partials(job: Job) -> None:
    for out in job.outputs:
        for path in (_partial(out), _partial(out) + ".meta"):
            if os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------- planning


def _input_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if f.endswith(INPUT_SUFFIXES) and not f.startswith(".")]
    return found


def plan_jobs(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, type_name: str | None = None
              ) -> list[Job]:
    """Map input files to output paths ``OUT/{train,valid}/<type>/<dataset>/<file>.bin``.

    The path below ``train/`` mirrors the input file's path below the INPUT
    folder it was found in (just its name for an INPUT file), without the
    suffix; ``--type`` is put in front, and without it a file that is not in
    a sub-folder goes under ``default/``. A bare ``<type>/<name>`` becomes
    ``<type>/<name>/<name>`` so that every file has a dataset folder.
    """
    if type_name is not None and (not type_name or "/" in type_name or type_name.startswith(".")):
        raise EvotuneError(f"--type {type_name!r}: give one folder name (no '/')")
    jobs: dict[str, Job] = {}
    sources: dict[str, str] = {}
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            files = _input_files(p)
            if not files:
                raise EvotuneError(f"{p}: this folder holds no {' or '.join(INPUT_SUFFIXES)} files")
            rels = [f.relative_to(p).with_suffix("").parts for f in files]
        elif p.is_file():
            if not p.name.endswith(INPUT_SUFFIXES):
                raise EvotuneError(f"{p}: expected a {' or '.join(INPUT_SUFFIXES)} file or a folder of them")
            files, rels = [p], [(p.stem,)]
        else:
            raise EvotuneError(f"{p}: no such file or folder")
        for f, parts in zip(files, rels):
            if type_name is not None:
                parts = (type_name, *parts)
            elif len(parts) == 1:
                parts = ("default", *parts)
            if len(parts) == 2:
                parts = (*parts, parts[1])
            rel = "/".join(parts) + ".bin"
            if rel in sources:
                raise EvotuneError(f"{sources[rel]} and {f} would both be written to {rel}; "
                                   "rename one or tokenize them into different output folders")
            sources[rel] = str(f)
            jobs[rel] = Job(str(f), tuple(os.path.join(os.fspath(out), s, rel) for s in SPLITS))
    return list(jobs.values())


# ---------------------------------------------------------------- driver

_WORKER: dict = {}


def _init_worker(tokenizer: str, options: Options, done_bytes, done_docs) -> None:
    if _WORKER.get("key") != (tokenizer, options):  # with fork the parent's encoder is inherited
        _WORKER.update(key=(tokenizer, options), encoder=RecordEncoder(load_codec(tokenizer), options))
    _WORKER.update(done_bytes=done_bytes, done_docs=done_docs)


def _work(index: int, job: Job) -> TokenizeStats:
    def report(nbytes: int, ndocs: int) -> None:
        _WORKER["done_bytes"][index] = nbytes
        _WORKER["done_docs"][index] = ndocs

    return tokenize_file(job, _WORKER["encoder"], report)


def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("tokenize"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[docs]:,} docs"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled)


def tokenize_files(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, tokenizer: str | os.PathLike, *,
                   fmt: str = "auto", template: str | None = None, text_key: str = "text",
                   max_length: int | None = None, overflow: str | None = None, valid_ratio: float = 0.0,
                   type_name: str | None = None, workers: int = 1, on_error: str = "skip",
                   overwrite: bool = False, progress: bool = True, map_fn: str | None = None) -> TokenizeStats:
    """Tokenize ``inputs`` into the InternEvo folder ``out``; returns the counts (see module docs)."""
    if fmt not in FORMATS:
        raise EvotuneError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if overflow not in (None, *OVERFLOW):
        raise EvotuneError(f"--overflow {overflow}: choose one of {', '.join(OVERFLOW)}")
    if on_error not in ("skip", "fail"):
        raise EvotuneError(f"--on-error {on_error}: choose skip or fail")
    if max_length is not None and max_length < 2:
        raise EvotuneError(f"--max-length {max_length}: a document needs at least 2 tokens to train on")
    if not 0 <= valid_ratio < 1:
        raise EvotuneError(f"--valid-ratio {valid_ratio}: give a number in [0, 1)")
    if workers < 1:
        raise EvotuneError(f"--workers {workers}: give at least 1")
    options = Options(fmt, template, text_key, max_length, overflow, valid_ratio, on_error, map_fn)
    tokenizer = os.fspath(tokenizer)
    encoder = RecordEncoder(load_codec(tokenizer), options)
    jobs = plan_jobs(inputs, out, type_name)
    existing = [p for job in jobs for p in job.outputs if os.path.exists(p) or os.path.exists(p + ".meta")]
    if existing and not overwrite:
        raise EvotuneError(f"{existing[0]} exists ({len(existing)} output files do); "
                           "pass --overwrite or choose another output folder")
    for path in existing:
        for p in (path, path + ".meta"):
            if os.path.exists(p):
                os.remove(p)

    sizes = [os.path.getsize(job.source) for job in jobs]
    workers = min(workers, len(jobs))
    if workers == 1:
        results = _run_here(jobs, sizes, encoder, progress)
    else:
        results = _run_pool(jobs, sizes, tokenizer, encoder, workers, progress)
    total = TokenizeStats()
    for r in results:
        total.add(r)
    return total


def _run_here(jobs, sizes, encoder, progress) -> list[TokenizeStats]:
    results = []
    with _progress(sum(sizes), progress) as bar:
        task = bar.add_task("tokenize", total=sum(sizes), docs=0)
        done_bytes = done_docs = 0
        for job, size in zip(jobs, sizes):
            def report(nbytes: int, ndocs: int) -> None:
                bar.update(task, completed=done_bytes + nbytes, docs=done_docs + ndocs)

            results.append(tokenize_file(job, encoder, report))
            done_bytes += size
            done_docs += sum(results[-1].docs.values())
    return results


def _run_pool(jobs, sizes, tokenizer, encoder, workers, progress) -> list[TokenizeStats]:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    done_bytes = ctx.Array("q", len(jobs), lock=False)
    done_docs = ctx.Array("q", len(jobs), lock=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker
    _WORKER.update(key=(tokenizer, encoder.options), encoder=encoder)
    # forked before the progress bar starts its refresh thread
    pool = ctx.Pool(workers, _init_worker, (tokenizer, encoder.options, done_bytes, done_docs))
    try:
        with _progress(sum(sizes), progress) as bar:
            task = bar.add_task("tokenize", total=sum(sizes), docs=0)
            order = sorted(range(len(jobs)), key=lambda i: -sizes[i])  # largest first: better balance
            pending = {i: pool.apply_async(_work, (i, jobs[i])) for i in order}
            while not all(r.ready() for r in pending.values()):
                bar.update(task, completed=sum(done_bytes), docs=sum(done_docs))
                failed = [r for r in pending.values() if r.ready() and not r.successful()]
                if failed:
                    failed[0].get()  # raises the worker's error
                time.sleep(0.1)
            results = [pending[i].get() for i in range(len(jobs))]
            bar.update(task, completed=sum(sizes), docs=sum(done_docs))
        pool.close()
        return results
    except BaseException:
        pool.terminate()
        for job in jobs:
            _remove_partials(job)
        raise
    finally:
        pool.join()


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Tokenize JSON-lines text ({'text': ...}) or chat ({'messages': [...]}) records into an "
                          "InternEvo folder OUT/train/<type>/<dataset>/<file>.bin (+ .bin.meta). "
                          "See docs/data-preparation.md.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl/.json files or folders of them")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a Hugging Face tokenizer folder or a sentencepiece .model file")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="record kind; auto: 'messages' -> chat, else text (default auto)")
    parser.add_argument("--template", choices=template_names(),
                        help="chat template (default: the tokenizer's own chat_template); XTuner's prompt template "
                             "names apply to XTuner's 'conversation' records and --map-fn")
    parser.add_argument("--map-fn", choices=sorted({*X.DATASET_FORMAT_MAPPING,
                                                    *(f.__name__ for f in X.DATASET_FORMAT_MAPPING.values())}),
                        help="an XTuner dataset map function every record goes through (alpaca, oasst1, ...)")
    parser.add_argument("--text-key", default="text", help="field holding the text of a text record (default text)")
    parser.add_argument("--type", dest="type_name", metavar="NAME",
                        help="data type folder to write under (default: the input's top-level sub-folder, "
                             "or 'default')")
    parser.add_argument("--max-length", type=int, metavar="N", help="longest document in tokens (default: no limit)")
    parser.add_argument("--overflow", choices=OVERFLOW,
                        help="what --max-length does to longer documents (default: split text, truncate chat)")
    parser.add_argument("--valid-ratio", type=float, default=0.0, metavar="R",
                        help="share of records written to OUT/valid, chosen by a hash of the record (default 0)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="parallel processes over input files")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                        help="invalid records: skip them (counted, first few shown) or stop (default skip)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def format_summary(stats: TokenizeStats) -> str:
    lines = []
    for split in SPLITS:
        if stats.docs[split] or split == "train":
            lines.append(f"{split}: {stats.docs[split]:,} documents, {stats.tokens[split]:,} tokens, "
                         f"{stats.supervised[split]:,} supervised")
    lines.append(f"{stats.files:,} input files, {stats.records:,} records, {len(stats.written):,} .bin files written")
    notes = [("truncated", stats.truncated), ("split", stats.split),
             ("documents dropped with no supervised token", stats.no_loss)]
    lines += [f"{n:,} {what}" for what, n in notes if n]
    if stats.zero_targets:
        lines.append(f"warning: {stats.zero_targets:,} trained tokens have id 0, which InternEvo never trains on "
                     "(a label must be positive)")
    if stats.invalid:
        lines.append(f"skipped {stats.invalid:,} invalid records; the first {len(stats.errors)}:")
        lines += [f"  {path}:{line}: {reason}" for path, line, reason in stats.errors]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    stats = tokenize_files(args.inputs, args.output, args.tokenizer, fmt=args.format, template=args.template,
                           text_key=args.text_key, max_length=args.max_length, overflow=args.overflow,
                           valid_ratio=args.valid_ratio, type_name=args.type_name, workers=args.workers,
                           on_error=args.on_error, overwrite=args.overwrite, progress=sys.stderr.isatty(),
                           map_fn=args.map_fn)
    print(format_summary(stats))
    if not stats.written:
        raise EvotuneError(f"no document was written to {args.output} (every record was invalid or had "
                           "nothing to train on; see above)")
    return 0
