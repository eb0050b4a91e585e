"""Read InternEvo tokenized folders (``.bin`` + ``.bin.meta``) into memory-mapped token indexes.

Each ``.bin`` is parsed once into a flat int32 token array (line order) plus, per
meta row, where its document starts in that array; the result is cached next to
the data (or in a cache folder) and memory-mapped afterwards, so packs are numpy
slices instead of ``json.loads`` calls. A cache entry is keyed by the size and
mtime of the ``.bin`` and of its meta, so a changed file is re-indexed.

The parser is vectorised: a 16 MB chunk of canonical lines (``{"tokens": [...]}``)
is validated with ``bytes.translate`` and a few numpy passes and parsed by
``np.fromstring``; in a chunk with other lines (other keys, ``\\r\\n``, odd
spacing, errors) only those go through ``json.loads``, which also yields the
error messages.

Reading rules are InternEvo's (docs/data.md, "The folder"): meta offset = column 0, document
length = last column, documents with ``length >= min_length`` are kept, the
walk is depth-first with names in ``sorted()`` order, type ids come from the
sorted top-level folders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from evotune.errors import EvotuneError

INDEX_VERSION = 2  # 2: meta rows must map one-to-one, in order, onto lines (older caches skipped that check)
CACHE_DIRNAME = ".evotune-index"
TOP_LEVEL_TYPE = "."  # type name of data files lying directly in the training folder
_CHUNK = 16 << 20  # bytes parsed per vectorised step
_INT32_MAX = 2**31 - 1
_CANONICAL = b'{"tokens":[]}\n'  # a canonical line once digits, '-', ',' and spaces are removed


# --------------------------------------------------------------------------- parsing


def _parse_line_json(line: bytes, path: str, lineno: int, offset: int) -> np.ndarray:
    """Tokens of one line via ``json.loads``; an error names the file, line and byte offset."""
    where = f"{path}: line {lineno} (byte offset {offset})"
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        text = line[:60].decode("utf-8", "replace")
        raise EvotuneError(f"{where} is not JSON ({e}); starts with {text!r}. "
                           "Every line of a .bin must be one JSON object with a 'tokens' list") from None
    if not isinstance(doc, dict) or "tokens" not in doc:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise EvotuneError(f"{where} has no 'tokens' key (found {keys}); "
                           "InternEvo .bin lines look like {\"tokens\": [1, 2, 3]}")
    tokens = doc["tokens"]
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise EvotuneError(f"{where}: 'tokens' must be a list of integers")
    return np.array(tokens, dtype=np.int64)


def _digit(bytes_: np.ndarray) -> np.ndarray:
    return (bytes_ - np.uint8(48)) < 10  # uint8 wraps below '0'


def _parse_chunk_fast(chunk: bytes, line_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens int64, per-line counts) if every line is canonical, else None.

    Canonical: ``{"tokens": [`` or ``{"tokens":[``, integers separated by commas
    (spaces allowed), ``]}``, optional spaces. Checked with one ``translate``
    (nothing but digits, '-', ',' and spaces besides the fixed structure) and the
    line heads; the numbers are read by ``np.fromstring``, which raises on two
    numbers without a comma between them. Its leniencies (an empty element
    before a comma reads as 0) are caught by counting: commas + 1 per line, the
    numbers read, and the runs of digits must all agree. Two harmless ones stay:
    ``- 1`` reads as -1 and ``01`` as 1 (``json.loads`` rejects both).
    """
    if chunk.translate(None, b" 0123456789-,") != _CANONICAL * len(line_starts):
        return None
    raw = np.frombuffer(chunk, dtype=np.uint8)
    heads = raw[np.minimum(line_starts[:, None] + np.arange(12), len(raw) - 1)]
    if not ((heads == _HEAD_SPACED).all(1) | (heads[:, :11] == _HEAD_TIGHT).all(1)).all():
        return None
    newlines = np.append(line_starts[1:], len(raw)) - 1
    commas = np.flatnonzero(raw == 44)
    per_line = np.diff(np.searchsorted(commas, newlines), prepend=0)
    counts = np.where(raw[newlines - 3] == 91, 0, per_line + 1)  # '[]}\n': an empty document
    digit = _digit(raw)
    runs = np.count_nonzero(digit[1:] > digit[:-1])
    try:  # '{"tokens": [1, 2]}\n' -> '            1, 2  ,'
        tokens = np.fromstring(chunk.translate(_STRUCTURE_TO_BLANK), dtype=np.int64, sep=",")
    except ValueError:
        return None
    if not len(tokens) == runs == int(counts.sum()):
        return None
    return tokens, counts


def _parse_chunk(chunk: bytes, line_starts: np.ndarray, path: str, lineno: int, base: int):
    """Fast path for the whole chunk; otherwise fast for its canonical lines, ``json.loads`` for the rest."""
    parsed = _parse_chunk_fast(chunk, line_starts)
    if parsed is not None:
        return parsed
    bounds = np.append(line_starts, len(chunk)).tolist()
    lines = [chunk[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    canon = np.array([line.translate(None, b" 0123456789-,") == _CANONICAL and line.startswith(_HEADS)
                      for line in lines], dtype=bool)
    counts = np.zeros(len(lines), dtype=np.int64)
    fast = None
    if canon.any():
        good = [line for line, c in zip(lines, canon) if c]
        fast = _parse_chunk_fast(b"".join(good), np.cumsum([0] + [len(g) for g in good[:-1]]))
        if fast is None:
            canon[:] = False
    slow = [_parse_line_json(lines[i], path, lineno + i, base + bounds[i]) for i in np.flatnonzero(~canon)]
    counts[~canon] = [len(d) for d in slow]
    if fast is not None:
        counts[canon] = fast[1]
    tokens = np.empty(int(counts.sum()), dtype=np.int64)
    from_fast = np.repeat(canon, counts)
    if fast is not None:
        tokens[from_fast] = fast[0]
    if slow:
        tokens[~from_fast] = np.concatenate(slow)
    return tokens, counts


_STRUCTURE_TO_BLANK = bytes.maketrans(b'{}[]":tokens\n', b"            ,")
_HEADS = (b'{"tokens": [', b'{"tokens":[')
_HEAD_SPACED = np.frombuffer(_HEADS[0], dtype=np.uint8)
_HEAD_TIGHT = np.frombuffer(_HEADS[1], dtype=np.uint8)


@dataclass
class _ParsedBin:
    line_starts: np.ndarray  # int64, byte offset of every line
    line_counts: np.ndarray  # int64, tokens per line
    max_token_id: int


def _parse_bin(path: str, tokens_out) -> _ParsedBin:
    """Parse every line of ``path``, appending int32 tokens to the open file ``tokens_out``."""
    size = os.path.getsize(path)
    starts, counts = [], []
    max_abs = 0
    if size == 0:
        return _ParsedBin(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos, lineno = 0, 1
        while pos < size:
            end = mm.find(b"\n", min(pos + _CHUNK, size) - 1)
            end = size if end < 0 else end + 1
            chunk = mm[pos:end]
            if not chunk.endswith(b"\n"):
                chunk += b"\n"  # a last line without newline
            local_starts = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)[:-1] + 1
            line_starts = np.concatenate([[0], local_starts]).astype(np.int64)
            tokens, line_counts = _parse_chunk(chunk, line_starts, path, lineno, pos)
            if len(tokens):
                lo, hi = int(tokens.min()), int(tokens.max())
                if lo < -_INT32_MAX or hi > _INT32_MAX:
                    bad = int(np.argmax(np.abs(tokens) > _INT32_MAX))
                    line = lineno + int(np.searchsorted(np.cumsum(line_counts), bad, side="right"))
                    raise EvotuneError(f"{path}: line {line}: token id {int(tokens[bad])} is beyond the int32 "
                                       "range; this is not tokenized text")
                max_abs = max(max_abs, hi, -lo)
                tokens.astype(np.int32).tofile(tokens_out)
            starts.append(line_starts + pos)
            counts.append(line_counts)
            lineno += len(line_starts)
            pos = end
    return _ParsedBin(np.concatenate(starts), np.concatenate(counts), max_abs)


def _read_meta(meta_path: str, bin_path: str) -> np.ndarray:
    if not os.path.exists(meta_path):
        raise EvotuneError(f"{bin_path}: its meta file {meta_path} is missing; InternEvo's tokenizer writes "
                           "both (evotune tokenize does too)")
    try:
        with open(meta_path, "rb") as f:
            meta = np.load(f, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable meta is the same user error
        raise EvotuneError(f"{meta_path}: not a NumPy .npy array ({e}); expected an (N, 2) int array "
                           "of (byte offset, token count)") from None
    if meta.ndim != 2 or meta.shape[1] < 2 or meta.dtype.kind not in "iu":
        raise EvotuneError(f"{meta_path}: expected an (N, 2+) integer array of (byte offset, ..., token count), "
                           f"found shape {meta.shape} dtype {meta.dtype}")
    return meta


def _match_meta(meta: np.ndarray, parsed: _ParsedBin, meta_path: str, bin_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Map meta rows onto parsed lines; returns (row_start in the token array, lengths)."""
    offsets = meta[:, 0].astype(np.int64)
    lengths = meta[:, -1].astype(np.int64)
    size = os.path.getsize(bin_path)
    if meta.dtype.itemsize <= 4 and len(offsets):
        # int32 offsets past 2 GiB turn negative, past 4 GiB small again (then they drop)
        drops = np.flatnonzero(np.diff(offsets) < 0) if size > 2**31 - 1 else []
        negative = np.flatnonzero(offsets < 0)
        if len(negative) or len(drops):
            row = int(negative[0]) if len(negative) else int(drops[0]) + 1
            raise EvotuneError(
                f"{meta_path}: row {row} has byte offset {int(offsets[row])} after "
                f"{int(offsets[row - 1]) if row else 'nothing'}: the {meta.dtype} offsets wrapped past 2 GiB "
                f"(the .bin is {size} bytes). Rewrite the meta with int64 offsets (evotune tokenize writes int64)")
    bad = np.flatnonzero((offsets < 0) | (offsets >= size))
    if len(bad):
        row = int(bad[0])
        raise EvotuneError(f"{meta_path}: row {row} points at byte {int(offsets[row])}, past the end of "
                           f"{bin_path} ({size} bytes); the meta belongs to another version of the file: "
                           "re-tokenize or regenerate the meta")
    if len(offsets) != len(parsed.line_starts):
        raise EvotuneError(f"{meta_path} has {len(offsets)} rows but {bin_path} has {len(parsed.line_starts)} "
                           "lines; each line needs exactly one meta row: regenerate the meta")
    # row r must point at line r: same count and in order, so no line is trained twice and none skipped
    misplaced = np.flatnonzero(parsed.line_starts != offsets)
    if len(misplaced):
        row = int(misplaced[0])
        line = int(np.searchsorted(parsed.line_starts, offsets[row]))
        if line < len(parsed.line_starts) and parsed.line_starts[line] == offsets[row]:
            raise EvotuneError(f"{meta_path}: row {row} points at line {line + 1} of {bin_path}, but row {row} must "
                               f"point at line {row + 1} (one row per line, in order): the meta repeats or skips "
                               "lines: regenerate it")
        raise EvotuneError(f"{meta_path}: row {row} offset {int(offsets[row])} is not the start of a line of "
                           f"{bin_path}; the meta does not belong to this file: regenerate it")
    line = np.arange(len(offsets))
    wrong = np.flatnonzero(parsed.line_counts[line] != lengths)
    if len(wrong):
        row = int(wrong[0])
        raise EvotuneError(f"{meta_path}: row {row} says {int(lengths[row])} tokens but line {int(line[row]) + 1} "
                           f"of {bin_path} has {int(parsed.line_counts[line[row]])}; regenerate the meta")
    token_starts = np.concatenate([[0], np.cumsum(parsed.line_counts)[:-1]]).astype(np.int64)
    return token_starts[line], lengths


# --------------------------------------------------------------------------- cache


def _dir_key(path: str) -> str:
    return hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:16]


def _cache_dirs(bin_dir: str) -> list[str]:
    """Candidate cache folders for data in ``bin_dir``: the first writable one is used to build."""
    env = os.environ.get("EVOTUNE_CACHE")
    if env:
        return [os.path.join(env, _dir_key(bin_dir))]
    home = os.path.join(os.path.expanduser("~"), ".cache", "evotune", "ftdp", _dir_key(bin_dir))
    return [os.path.join(bin_dir, CACHE_DIRNAME), home]


def _file_key(bin_path: str, meta_path: str) -> str:
    b, m = os.stat(bin_path), os.stat(meta_path)
    text = f"v{INDEX_VERSION}:{b.st_size}:{b.st_mtime_ns}:{m.st_size}:{m.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def _remove_stale(cache_dir: str, name: str, key: str) -> None:
    """Delete the entries of older versions of ``name`` (other keys) in ``cache_dir``."""
    pattern = re.compile(re.escape(name) + r"\.([0-9a-f]{16})\.(tokens|index\.npz)")
    for entry in os.listdir(cache_dir):
        m = pattern.fullmatch(entry)
        if m and m.group(1) != key:
            try:
                os.remove(os.path.join(cache_dir, entry))
            except OSError:  # another process removed it first
                pass


def _build_index(bin_path: str, meta_path: str, cache_dir: str, key: str) -> None:
    """Parse one file into ``cache_dir`` (atomic renames: a concurrent builder is harmless)."""
    name = os.path.basename(bin_path)
    tokens_path = os.path.join(cache_dir, f"{name}.{key}.tokens")
    index_path = os.path.join(cache_dir, f"{name}.{key}.index.npz")
    tmp = f".{os.getpid()}.tmp"
    meta = _read_meta(meta_path, bin_path)
    try:
        with open(tokens_path + tmp, "wb") as out:
            parsed = _parse_bin(bin_path, out)
        row_start, lengths = _match_meta(meta, parsed, meta_path, bin_path)
        with open(index_path + tmp, "wb") as f:
            np.savez(f, row_start=row_start, lengths=lengths, max_token_id=np.int64(parsed.max_token_id))
        os.replace(tokens_path + tmp, tokens_path)
        os.replace(index_path + tmp, index_path)  # last: its presence marks a complete entry
    finally:
        for p in (tokens_path + tmp, index_path + tmp):
            if os.path.exists(p):
                os.remove(p)
    _remove_stale(cache_dir, name, key)


def _find_index(bin_path: str, key: str) -> str | None:
    name = os.path.basename(bin_path)
    for d in _cache_dirs(os.path.dirname(bin_path)):
        if os.path.exists(os.path.join(d, f"{name}.{key}.index.npz")):
            return os.path.join(d, f"{name}.{key}")
    return None


def index_file(bin_path: str) -> str:
    """Make sure ``bin_path`` has an up-to-date index; returns the cache entry's path stem."""
    meta_path = bin_path + ".meta"
    if not os.path.exists(meta_path):
        _read_meta(meta_path, bin_path)  # raises the missing-meta error
    key = _file_key(bin_path, meta_path)
    found = _find_index(bin_path, key)
    if found:
        return found
    name = os.path.basename(bin_path)
    for d in _cache_dirs(os.path.dirname(bin_path)):
        if _writable_dir(d):
            _build_index(bin_path, meta_path, d, key)
            return os.path.join(d, f"{name}.{key}")
    raise EvotuneError(f"{bin_path}: no writable cache folder for its index (tried "
                       f"{', '.join(_cache_dirs(os.path.dirname(bin_path)))}); set EVOTUNE_CACHE to a writable folder")


# --------------------------------------------------------------------------- folder


@dataclass
class FtdpFile:
    """One ``.bin`` file's index: documents are slices of the memory-mapped ``tokens``.

    ``row_start[r]`` / ``lengths[r]`` locate meta row ``r`` in ``tokens`` (int32, signed:
    a negative id is an input that is never a target). ``kept`` are the rows with
    ``length >= min_length``, in meta order.
    """

    path: str
    rel_path: str
    type_id: int
    tokens: np.ndarray
    row_start: np.ndarray
    lengths: np.ndarray
    kept: np.ndarray
    max_token_id: int
    tokens_path: str | None = None  # the cache file ``tokens`` maps

    def __getstate__(self) -> dict:
        """Pickle the map's path, not its contents (DataLoader workers, spawn)."""
        return {**self.__dict__, "tokens": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.tokens = _map_tokens(self.tokens_path)

    def document(self, row: int) -> np.ndarray:
        start = int(self.row_start[row])
        return np.asarray(self.tokens[start:start + int(self.lengths[row])])

    @property
    def num_tokens(self) -> int:
        """Tokens in the kept documents."""
        return int(self.lengths[self.kept].sum())


@dataclass
class FtdpFolder:
    """A training folder: its files in concatenation order (files with no kept document left out)."""

    folder: str
    files: list[FtdpFile]
    type_names: list[str]
    min_length: int = 0
    file_type: str = ".bin"
    max_token_id: int = field(init=False)

    def __post_init__(self):
        self.max_token_id = max((f.max_token_id for f in self.files), default=0)

    @property
    def num_tokens(self) -> int:
        return sum(f.num_tokens for f in self.files)

    def fingerprint(self) -> str:
        """What the data order depends on, from the index (no pass over the tokens): each file's
        path, size and document lengths, and ``min_length``. Stored in checkpoints, so a resume
        on changed data is noticed (evotune/checkpoint/checkpointer.py)."""
        h = hashlib.sha1(f"{self.min_length}".encode())
        for f in self.files:
            h.update(f"{f.rel_path}:{os.path.getsize(f.path)}:".encode())
            h.update(np.ascontiguousarray(f.lengths, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise naming the first file and row whose token id does not fit ``vocab_size``."""
        if self.max_token_id < vocab_size:
            return
        for f in self.files:
            if f.max_token_id >= vocab_size:
                bad = int(np.argmax(np.abs(np.asarray(f.tokens)) >= vocab_size))
                row = int(np.flatnonzero((f.row_start <= bad) & (bad < f.row_start + f.lengths))[0])
                raise EvotuneError(
                    f"{f.path}: meta row {row} has token id {abs(int(f.tokens[bad]))}, beyond the model's "
                    f"vocabulary of {vocab_size}: the data was tokenized for another model "
                    "(check pretrained_model_name_or_path)")


def walk_data_files(folder: str, file_type: str = ".bin") -> list[str]:
    """Relative paths of the data files, depth-first, names in ``sorted()`` order, links followed.

    As ``os.walk(followlinks=True)``: a folder reached through two links is
    walked twice; only a link back to an enclosing folder (a loop) is not followed.
    """
    out: list[str] = []

    def visit(path: str, rel: str, ancestors: frozenset) -> None:
        real = os.path.realpath(path)
        if real in ancestors:
            return
        dirs = []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isdir(full):
                if name != CACHE_DIRNAME:
                    dirs.append(name)
            elif name.endswith(file_type):
                out.append(f"{rel}{name}")
        for name in dirs:
            visit(os.path.join(path, name), f"{rel}{name}/", ancestors | {real})

    visit(folder, "", frozenset())
    return out


def walk_listing_order(folder: str, file_type: str = ".bin") -> list[str]:
    """Relative paths of the data files in the order InternEvo's and XTuner's own code reads them.

    Both do ``list(os.walk(folder, followlinks=True))`` and only then
    ``dirs.sort()`` for each entry: the walk is already done, so folders are
    visited in the filesystem's listing order (``os.scandir``, top-down), and
    only the files of each folder are ``sorted()``. That order depends on the
    filesystem, so ``evotune data-order FOLDER --walk internevo`` writes it on the
    machine of the original run for ``data_order_path``. (Their walk would follow
    a link back to an enclosing folder until the path is too long; here such a
    loop is not entered.)
    """
    out: list[str] = []
    ancestors: dict[str, frozenset] = {}  # walked folder -> real paths of it and its parents (loops)
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        parent = ancestors.get(os.path.dirname(root), frozenset())
        ancestors[root] = parent | {real}
        dirs[:] = [d for d in dirs if d != CACHE_DIRNAME
                   and os.path.realpath(os.path.join(root, d)) not in ancestors[root]]
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        out += [prefix + name for name in sorted(files) if name.endswith(file_type)]
    return out


def read_data_order(folder: str, data_order_path: str, file_type: str) -> list[str]:
    if not os.path.isfile(data_order_path):
        raise EvotuneError(f"data_order_path {data_order_path} does not exist; write one with "
                           f"'evotune data-order {folder} -o {data_order_path}' or set data_order_path=None")
    paths, seen = [], {}
    with open(data_order_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rel = line.strip()
            if not rel:
                continue
            rel = rel.replace(os.sep, "/")
            if os.path.isabs(rel) or rel.startswith("../"):
                raise EvotuneError(f"{data_order_path}: line {lineno}: '{rel}' must be a path relative to {folder}")
            if not os.path.isfile(os.path.join(folder, rel)):
                raise EvotuneError(f"{data_order_path}: line {lineno}: '{rel}' does not exist in {folder}; "
                                   "fix the line or regenerate the file with 'evotune data-order'")
            if rel in seen:
                raise EvotuneError(f"{data_order_path}: line {lineno}: '{rel}' is already listed on line {seen[rel]}")
            seen[rel] = lineno
            paths.append(rel)
    return paths


def _type_names(folder: str, rel_paths: list[str]) -> list[str]:
    names = sorted(n for n in os.listdir(folder)
                   if n != CACHE_DIRNAME and os.path.isdir(os.path.join(folder, n)))
    if any("/" not in p for p in rel_paths):
        names.append(TOP_LEVEL_TYPE)
    return names


def distributed():
    """torch.distributed when a process group is up (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _load_file(path: str, rel: str, type_id: int, min_length: int) -> FtdpFile:
    stem = index_file(path)
    with np.load(stem + ".index.npz") as z:
        row_start, lengths, max_id = z["row_start"], z["lengths"], int(z["max_token_id"])
    tokens_path = stem + ".tokens" if lengths.sum() else None
    kept = np.flatnonzero(lengths >= min_length) if min_length > 0 else np.arange(len(lengths))
    return FtdpFile(path, rel, type_id, _map_tokens(tokens_path), row_start, lengths, kept, max_id, tokens_path)


def _map_tokens(tokens_path: str | None) -> np.ndarray:
    """The token index, memory-mapped (a plain ndarray view: slicing it skips np.memmap's bookkeeping)."""
    if tokens_path is None:
        return np.zeros(0, np.int32)
    return np.memmap(tokens_path, dtype=np.int32, mode="r").view(np.ndarray)


def load_intern_repo_tokenized_dataset(folder, min_length: int = 0, data_order_path=None,
                                       file_type: str = ".bin") -> FtdpFolder:
    """Index every data file of ``folder`` (cached) and return them in InternEvo's order.

    Order: ``data_order_path`` (one path per line, relative to ``folder``; only the
    listed files are used) or the sorted depth-first walk. Under torch.distributed,
    rank 0 builds missing indexes while the others wait at a barrier, then every
    rank maps them (a rank that cannot see rank 0's cache builds its own).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise EvotuneError(f"dataset folder {folder} does not exist or is not a folder")
    if data_order_path is not None:
        rel_paths = read_data_order(folder, os.fspath(data_order_path), file_type)
    else:
        rel_paths = walk_data_files(folder, file_type)
    if not rel_paths:
        raise EvotuneError(f"dataset folder {folder} has no '*{file_type}' file")
    return load_files(folder, rel_paths, min_length, file_type)


def load_files(folder: str, rel_paths: list[str], min_length: int = 0, file_type: str = ".bin") -> FtdpFolder:
    """Index the given files of ``folder`` (relative paths, in this order) into a folder object."""
    type_names = _type_names(folder, rel_paths)
    dist = distributed()
    if dist is not None and dist.get_rank() == 0:
        for rel in rel_paths:
            index_file(os.path.join(folder, rel))
    if dist is not None:
        dist.barrier()

    files = []
    for rel in rel_paths:
        top = rel.split("/", 1)[0] if "/" in rel else TOP_LEVEL_TYPE
        f = _load_file(os.path.join(folder, rel), rel, type_names.index(top), min_length)
        if len(f.kept):  # InternEvo skips a file left without documents
            files.append(f)
    if not files:
        raise EvotuneError(f"dataset folder {folder}: no document has min_length={min_length} tokens or more "
                           f"(in {len(rel_paths)} files); lower min_length or check the data")
    return FtdpFolder(folder, files, type_names, min_length, file_type)


# --------------------------------------------------------------------------- CLI: evotune data-order


def add_arguments_data_order(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="InternEvo training folder")
    parser.add_argument("-o", "--output", help="order file to write (default: print)")
    parser.add_argument("--file-type", default=".bin", help="data file suffix (default .bin)")
    parser.add_argument("--walk", choices=("sorted", "internevo"), default="sorted",
                        help="sorted: folders and files in sorted order (evotune's default order); internevo: the "
                             "order InternEvo's and XTuner's own walk gives on this filesystem (folders in listing "
                             "order), to pin a run made with them (run it on that machine)")


def main_data_order(args: argparse.Namespace) -> int:
    """Write the walk order (sorted, or InternEvo's listing order), to pin it with ``data_order_path``."""
    if not os.path.isdir(args.folder):
        raise EvotuneError(f"folder {args.folder} does not exist")
    walk = walk_listing_order if args.walk == "internevo" else walk_data_files
    paths = walk(args.folder, args.file_type)
    if not paths:
        raise EvotuneError(f"folder {args.folder} has no '*{args.file_type}' file")
    text = "".join(p + "\n" for p in paths)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {len(paths)} paths to {args.output}")
    else:
        sys.stdout.write(text)
    return 0
