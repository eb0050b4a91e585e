"""XTuner's data path: ``process_hf_dataset`` and ``load_intern_repo_untokenized_dataset``.

Both take XTuner's arguments and give what the rest of evotune already trains
on: records are mapped to XTuner's ``conversation`` format, templated and
tokenized with XTuner's loss rule (evotune/data/xtuner_maps.py), written once
as an InternEvo tokenized folder (signed ids: a negative id is input only)
and then read like any InternEvo folder (evotune/data/ftdp.py) and packed by
evotune's packing (evotune/data/packing.py): documents keep their boundaries,
labels are InternEvo's, and sampler, collate and loss are unchanged.

The tokenized folder is a cache entry named by a hash of what decides its
tokens: the data (each file's path, size and modification time, or a built
dataset's fingerprint), the tokenizer (its files' contents), the map
function and template, ``max_length`` and the selection arguments. A second
run with the same inputs reads the entry and tokenizes nothing. Entries live in
``$EVOTUNE_CACHE/xtuner`` when that is set, else in the Hugging Face datasets
cache (``$HF_DATASETS_CACHE``, default ``$HF_HOME/datasets``) under ``evotune``.
Under torch.distributed rank 0 writes the entry while the others wait.

Where evotune differs from XTuner (docs/migrating-from-xtuner.md, "Data"):
``shuffle_before_pack`` shuffles with InternEvo's fixed seed (XTuner's shuffle is
unseeded); a document cut by a pack's end keeps its next-token target (XTuner
loses it); ``use_varlen_attn=False`` packs are one attention window, as in
XTuner, but no token learns to predict the next document.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from evotune.config import build
from evotune.data import xtuner_maps as X
from evotune.data.ftdp import FtdpFolder, distributed, load_files, read_data_order, walk_data_files
from evotune.data.ftdp_write import BinWriter
from evotune.data.packing import FILE_SHUFFLE_SEED, PackedDataset
from evotune.data.templates import RecordError
from evotune.data.tokenize import iter_records
from evotune.errors import EvotuneError

CACHE_VERSION = 1  # bump when the tokens written for the same inputs change
IGNORE_INDEX = -100
DATA_SUFFIXES = (".json", ".jsonl")
XTUNER_MAP_NUM_PROC = 32  # the processes XTuner's untokenized loader maps with


# --------------------------------------------------------------------------- records


@dataclass
class Source:
    """Where records come from: ``where`` names it in messages; ``records()`` yields (file, number, record)."""

    where: str
    key: object  # what identifies the data in the cache key
    records: Callable[[], Iterator[tuple[str, int, object]]]  # (file or dataset name, record number, record)
    name: str  # a short name for the tokenized file (also its data type)


def _file_records(paths: list[str]) -> Iterator[tuple[str, int, object]]:
    for path in paths:
        for rec in iter_records(path):
            if rec.error is not None:
                raise EvotuneError(f"{path}: record {rec.line}: {rec.error}")
            yield path, rec.line, rec.value


def _file_key(paths: list[str]) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
    return out


def _json_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(DATA_SUFFIXES) and not f.startswith(".")]
    return found


def _is_saved_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("dataset_dict.json", "state.json"))


def _files_source(paths: list[str], where: str) -> Source:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise EvotuneError(f"{where}: data file {missing[0]} does not exist")
    if not paths:
        raise EvotuneError(f"{where}: no data files (.json or .jsonl)")
    name = os.path.splitext(os.path.basename(paths[0]))[0]
    return Source(where, _file_key(paths), lambda: _file_records(paths), name)


def _split_files(data_files, split, where: str) -> list[str]:
    """``data_files`` of ``load_dataset``: a path, a list, or ``{split: path or list}``."""
    if isinstance(data_files, dict):
        if split is None:
            chosen = list(data_files.values())
        elif split in data_files:
            chosen = [data_files[split]]
        else:
            raise EvotuneError(f"{where}: split {split!r} is not in data_files ({', '.join(data_files)})")
        return [p for c in chosen for p in ([c] if isinstance(c, (str, os.PathLike)) else c)]
    if split not in (None, "train"):
        raise EvotuneError(f"{where}: data_files without split names form one split 'train', not {split!r}")
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    if isinstance(data_files, (list, tuple)):
        return [os.fspath(p) for p in data_files]
    raise EvotuneError(f"{where}: data_files must be a path, a list of paths or a dict of them, got {data_files!r}")


def _dataset_records(dataset, name: str) -> Iterator[tuple[str, int, object]]:
    for i, row in enumerate(dataset):
        yield name, i + 1, row


def _built_source(dataset, split, where: str) -> Source:
    """A built ``datasets.Dataset`` / ``DatasetDict`` (split chosen as XTuner does)."""
    import datasets  # here, not at the top: importing it takes seconds and json files do not need it

    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            dataset = datasets.concatenate_datasets(list(dataset.values()))
        elif split in dataset:
            dataset = dataset[split]
        else:
            raise EvotuneError(f"{where}: split {split!r} is not in the dataset ({', '.join(dataset)})")
    if not isinstance(dataset, datasets.Dataset):
        raise EvotuneError(f"{where}: expected a datasets.Dataset, got {type(dataset).__name__}")
    name = (dataset.info.dataset_name or dataset.info.builder_name or "hf_dataset") if dataset.info else "hf_dataset"
    return Source(where, ["fingerprint", dataset._fingerprint, len(dataset)],
                  lambda: _dataset_records(dataset, where), name)


def _is_load_dataset(fn) -> bool:
    return getattr(fn, "__name__", "") == "load_dataset" and getattr(fn, "__module__", "").startswith("datasets")


def source_of(dataset, split="train") -> Source:
    """XTuner's ``dataset`` argument as records.

    ``dict(type=load_dataset, path='json', data_files=...)``, or ``path`` a local
    ``.json``/``.jsonl`` file or a folder of them: the files are read here,
    record by record (no Arrow conversion), so a bad record is named by file
    and record number. A folder written by ``save_to_disk``, any other
    ``type=`` dict (a hub data set) and a built ``datasets`` object are read
    through ``datasets``.
    """
    where = "process_hf_dataset: dataset"
    if isinstance(dataset, (str, os.PathLike)):
        dataset = {"path": os.fspath(dataset)}
    if isinstance(dataset, dict) and (_is_load_dataset(dataset.get("type")) or "type" not in dataset):
        args = {k: v for k, v in dataset.items() if k != "type"}
        path = args.get("path")
        split = args.get("split", split)
        unknown = sorted(set(args) - {"path", "data_files", "split", "data_dir", "name"})
        local = isinstance(path, str) and os.path.exists(path)
        if path in ("json", "jsonl") or local:
            if unknown:
                raise EvotuneError(f"{where}: load_dataset argument {unknown[0]!r} is not read for local json data "
                                   "(evotune reads path, data_files and split)")
            if path in ("json", "jsonl"):
                if "data_files" in args:
                    return _files_source(_split_files(args["data_files"], split, where), where)
                if args.get("data_dir") and os.path.isdir(args["data_dir"]):  # every json file under it
                    return _files_source(_json_files(args["data_dir"]), f"{where} {args['data_dir']}")
                raise EvotuneError(f"{where}: load_dataset(path={path!r}) needs data_files or data_dir "
                                   f"(an existing folder), got {args.get('data_dir')!r}")
            if os.path.isfile(path):
                return _files_source([path], where)
            if _is_saved_dataset(path):
                import datasets  # only a saved Arrow folder needs it (its import takes seconds)

                return _built_source(datasets.load_from_disk(path), split, where)
            files = (_split_files(args["data_files"], split, where) if "data_files" in args
                     else _json_files(os.path.join(path, args.get("data_dir") or "")))
            files = [f if os.path.isabs(f) or os.path.exists(f) else os.path.join(path, f) for f in files]
            return _files_source(files, f"{where} {path}")
        if "type" not in dataset:
            raise EvotuneError(f"{where}: {path!r} is not a local file or folder; give dict(type=load_dataset, ...)")
    if isinstance(dataset, dict) and "type" in dataset:
        built = build(dataset)
        return _built_source(built, split, where)
    return _built_source(dataset, split, where)


# --------------------------------------------------------------------------- tokenizer


@dataclass
class Encoder:
    """How XTuner tokenizes: ``encode(texts)`` without added special tokens; BOS/EOS around turns."""

    encode: Callable[[list[str]], list[list[int]]]
    bos: list[int]
    eos: list[int]
    key: str

    @classmethod
    def of(cls, tokenizer) -> "Encoder":
        tok = build(tokenizer) if isinstance(tokenizer, dict) else tokenizer
        if tok is None or not callable(getattr(tok, "encode", None)):
            raise EvotuneError(f"tokenizer: expected a tokenizer or dict(type=AutoTokenizer.from_pretrained, ...), "
                               f"got {tokenizer!r}")
        eos = tok.eos_token_id
        if eos is None:
            raise EvotuneError(f"tokenizer {getattr(tok, 'name_or_path', '')}: no EOS token, which XTuner's turns "
                               "end with")
        bos = X.turn_bos(type(tok).__name__, tok.bos_token_id)

        def encode(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"] if texts else []

        return cls(encode, bos, [eos], _tokenizer_key(tok, bos, [eos]))


def _tokenizer_key(tok, bos, eos) -> str:
    """A hash of the tokenizer's files (its folder), else of its vocabulary, with its class and BOS/EOS."""
    h = hashlib.sha1(f"{type(tok).__name__}:{bos}:{eos}".encode())
    folder = getattr(tok, "name_or_path", "")
    names = sorted(n for n in os.listdir(folder) if n.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                                 "added_tokens"))) if os.path.isdir(folder) else []
    if names:
        for n in names:
            h.update(n.encode())
            with open(os.path.join(folder, n), "rb") as f:
                h.update(hashlib.sha1(f.read()).digest())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the cache


def cache_root() -> str:
    """Where the tokenized entries live (module doc), read from the environment at each call."""
    env = os.environ.get("EVOTUNE_CACHE")
    if env:
        return os.path.join(env, "xtuner")
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "datasets")
    return os.path.join(datasets_cache, "evotune")


def _function_key(fn) -> object:
    """What identifies a map function: a template's values, else its qualified name and source."""
    if fn is None:
        return None
    template = X.template_of(fn)
    if template is not None:
        return ["template", dict(template)]
    if isinstance(fn, functools.partial):
        return ["partial", _function_key(fn.func), repr(fn.args), repr(sorted(fn.keywords.items()))]
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), source]


@dataclass
class _Stats:
    records: int = 0
    documents: int = 0
    empty: int = 0  # no turn after mapping (XTuner drops them)
    no_loss: int = 0  # no trained token (XTuner drops them)
    truncated: int = 0
    zero_targets: int = 0

    def add(self, other: "_Stats") -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


def _cached(key_parts: dict, write: Callable[[str], _Stats]) -> tuple[str, dict]:
    """The cache entry for ``key_parts`` (written by ``write(tmp_dir)`` when missing) and its summary
    (:class:`_Stats`' fields, ``built``: whether this call wrote it)."""
    key = hashlib.sha1(json.dumps({"v": CACHE_VERSION, **key_parts}, sort_keys=True, default=str).encode())
    entry = os.path.join(cache_root(), key.hexdigest()[:20])
    done = os.path.join(entry, "evotune-tokenized.json")
    dist = distributed()
    built = False
    if not os.path.isfile(done) and (dist is None or dist.get_rank() == 0):
        built = True
        tmp = f"{entry}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
        except OSError as e:
            raise EvotuneError(f"cannot write the tokenized data cache at {tmp} ({e}); set EVOTUNE_CACHE "
                               "to a writable folder") from e
        try:
            stats = write(tmp)
            with open(os.path.join(tmp, "evotune-tokenized.json"), "w") as f:
                json.dump({"key": key_parts, "stats": stats.__dict__}, f, default=str, indent=1)
            if os.path.isdir(entry) and not os.path.isfile(done):  # an unfinished entry of an earlier run
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.replace(tmp, entry)
            except OSError:  # another process (another run on this machine) finished the same entry first
                if not os.path.isfile(done):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    with open(done) as f:
        return entry, {**json.load(f)["stats"], "built": built}


def _signed(tokens: list[int], stats: _Stats) -> bool:
    """Count ``tokens`` in ``stats``; False when nothing in it is trained (XTuner drops the record)."""
    if not any(t > 0 for t in tokens[1:]):
        stats.no_loss += 1
        return False
    stats.zero_targets += sum(1 for t in tokens[1:] if t == 0)
    return True


@dataclass
class _Recipe:
    """How one record becomes signed ids (``tokens``), or None when XTuner drops it; a bad record is
    one EvotuneError naming where it is."""

    encoder: Encoder | None
    map_fn: Callable | None = None
    template_fn: Callable | None = None
    rename_maps: tuple = ()
    tokenized: bool = False  # records hold input_ids and labels already

    def tokens(self, where: str, number: int, record) -> list[int] | None:
        try:
            if self.tokenized:
                return _pretokenized(record)
            e = self.encoder
            return X.record_tokens(record, e.encode, e.bos, e.eos, None, self.map_fn, self.template_fn,
                                   self.rename_maps)
        except KeyError as e:
            field = e.args[0] if e.args else "?"
            by = f" ({getattr(self.map_fn, '__name__', 'dataset_map_fn')} reads it)" if self.map_fn else ""
            raise EvotuneError(f"{where}: record {number}: no field {field!r}{by}") from None
        except RecordError as e:
            raise EvotuneError(f"{where}: record {number}: {e}") from None


_CHUNK = 256  # records per task of a tokenizing worker
_WORK: dict = {}  # what forked workers read: set before the pool forks, so nothing is pickled but results


def _tokens_of_chunk(bounds: tuple[int, int]) -> list:
    """Worker: the chunk's results in order; a bad record ends the chunk with its EvotuneError."""
    out: list = []
    for where, number, record in _WORK["records"][bounds[0]:bounds[1]]:
        try:
            out.append(_WORK["recipe"].tokens(where, number, record))
        except EvotuneError as e:
            out.append(e)
            break
    return out


def _all_tokens(records, recipe: _Recipe, workers: int) -> Iterator[list[int] | None]:
    """Each record's tokens in record order; with ``workers`` > 1 and enough records, from a fork pool
    (XTuner's ``map_num_proc``: at most that many processes, and no more than the CPUs)."""
    workers = min(int(workers or 1), os.cpu_count() or 1)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        records = list(records)
    if workers <= 1 or not isinstance(records, list) or len(records) < 2 * _CHUNK:
        for where, number, record in records:
            yield recipe.tokens(where, number, record)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker
    _WORK.update(records=records, recipe=recipe)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for chunk in pool.imap(_tokens_of_chunk, [(a, a + _CHUNK) for a in range(0, len(records), _CHUNK)]):
                for result in chunk:
                    if isinstance(result, EvotuneError):
                        raise result
                    yield result
    finally:
        _WORK.clear()


def _tokenize_records(records, writer_path: str, recipe: _Recipe, max_length: int | None,
                      max_dataset_length: int | None = None, workers: int = 1) -> _Stats:
    """Write the documents of ``records`` (cut at ``max_length``) to ``writer_path``; the counts."""
    stats = _Stats()
    if max_dataset_length is not None:  # XTuner's random subset, with InternEvo's fixed seed
        records = list(records)
        n = min(int(max_dataset_length), len(records))
        records = [records[i] for i in np.random.RandomState(FILE_SHUFFLE_SEED).choice(len(records), n, replace=False)]
    writer = None
    try:
        for tokens in _all_tokens(records, recipe, workers):
            stats.records += 1
            if tokens is None:
                stats.empty += 1
                continue
            if max_length is not None and len(tokens) > max_length:
                stats.truncated += 1
                tokens = tokens[:max_length]
            if not _signed(tokens, stats):
                continue
            if writer is None:
                writer = BinWriter(writer_path)
            writer.write(tokens)
            stats.documents += 1
    finally:
        if writer is not None:
            writer.close()
    return stats


def _pretokenized(record) -> list[int]:
    """A record that already holds ``input_ids`` and ``labels`` (XTuner's, unshifted: -100 = no loss)."""
    ids, labels = record["input_ids"], record["labels"]
    if len(ids) != len(labels):
        raise RecordError(f"input_ids has {len(ids)} tokens but labels {len(labels)}")
    return [int(t) if label != IGNORE_INDEX else -int(t) for t, label in zip(ids, labels)]


def _say(stats: dict, what: str, entry: str) -> None:
    notes = [f"{stats['documents']:,} documents from {stats['records']:,} records"]
    notes += [f"{stats[k]:,} {text}" for k, text in (("empty", "without a turn dropped"),
                                                      ("no_loss", "without a trained token dropped"),
                                                      ("truncated", "cut at max_length")) if stats.get(k)]
    how = "tokenized into" if stats["built"] else "read from the cache"
    print(f"evotune: {what}: {', '.join(notes)} ({how} {entry})")
    if stats.get("zero_targets"):
        print(f"evotune: warning: {stats['zero_targets']:,} trained tokens have id 0, which InternEvo's labels "
              "never train (a label must be positive)")


# --------------------------------------------------------------------------- XTuner's functions


def process_hf_dataset(dataset, do_dataset_tokenization: bool = True, tokenizer=None, max_length: int | None = None,
                       dataset_map_fn=None, template_map_fn=None, max_dataset_length: int | None = None,
                       split: str | None = "train", remove_unused_columns: bool = False, rename_maps=(),
                       shuffle_before_pack: bool = True, pack_to_max_length: bool = True,
                       use_varlen_attn: bool = False, input_ids_with_output: bool = True,
                       with_image_token: bool = False, map_num_proc: int = 32) -> PackedDataset:
    """XTuner's ``process_hf_dataset``: records -> conversation -> template -> tokens -> packs of ``max_length``.

    ``dataset``: see :func:`source_of`. ``dataset_map_fn``: one of XTuner's map
    functions (or its name), your own function, or None for records already in
    XTuner's ``conversation`` format. ``template_map_fn``:
    ``template_map_fn_factory(template=...)`` (built or as a ``type=`` dict).
    ``use_varlen_attn``: True, every document is its own attention segment
    (``cu_seqlens``); False, a pack is one attention window as in XTuner.
    ``shuffle_before_pack``: documents are shuffled with InternEvo's fixed seed
    1024 before packing, else packed in record order. ``remove_unused_columns``
    changes nothing (only token ids are kept, as XTuner forces when packing);
    ``map_num_proc``: at most that many processes tokenize (no more than the
    CPUs; one for fewer than 512 records), once: the result is cached.
    """
    for name, value, wanted, why in (
            ("pack_to_max_length", pack_to_max_length, True, "evotune trains on packs of max_length tokens "
             "(documents keep their boundaries with use_varlen_attn=True); set pack_to_max_length=True"),
            ("input_ids_with_output", input_ids_with_output, True, "training needs the outputs in the tokens "
             "(False is XTuner's evaluation setting)"),
            ("with_image_token", with_image_token, False, "evotune trains language models only (no image tokens)")):
        if bool(value) is not wanted:
            raise EvotuneError(f"process_hf_dataset: {name}={value!r}: {why}")
    if max_length is None or int(max_length) < 2:
        raise EvotuneError(f"process_hf_dataset: max_length must be a number of tokens >= 2, got {max_length!r}")
    max_length = int(max_length)
    source = source_of(dataset, split)
    map_fn = X.dataset_map_fn_of(dataset_map_fn)
    template_fn = build(template_map_fn) if isinstance(template_map_fn, dict) else template_map_fn
    encoder = Encoder.of(tokenizer) if do_dataset_tokenization else None
    rename_maps = [tuple(pair) for pair in rename_maps]
    rel = f"{_safe(source.name)}/{_safe(source.name)}.bin"
    key = {"kind": "process_hf_dataset", "data": source.key, "split": split,
           "tokenizer": encoder.key if encoder else None, "dataset_map_fn": _function_key(map_fn),
           "template_map_fn": _function_key(template_fn), "max_length": max_length,
           "max_dataset_length": max_dataset_length, "rename_maps": rename_maps,
           "tokenized": not do_dataset_tokenization}

    def write(tmp: str) -> _Stats:
        recipe = _Recipe(encoder, map_fn, template_fn, tuple(rename_maps), not do_dataset_tokenization)
        return _tokenize_records(source.records(), os.path.join(tmp, rel), recipe,
                                 max_length if do_dataset_tokenization else None, max_dataset_length, map_num_proc)

    entry, stats = _cached(key, write)
    _say(stats, source.where, entry)
    if not stats["documents"]:
        raise EvotuneError(f"{source.where}: no record has a trained token after mapping and templating "
                           f"({stats['records']} records); check dataset_map_fn and the data")
    folder = load_files(entry, [rel])
    return PackedDataset(folder, max_length, seed=FILE_SHUFFLE_SEED, max_length_per_sample=max_length,
                         pack_sample_into_one=not use_varlen_attn, shuffle_documents=bool(shuffle_before_pack))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(".") or "data"


def _json_line_records(path: str) -> Iterator[tuple[str, int, object]]:
    """XTuner's untokenized files: every line is one JSON list of messages (openai format)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvotuneError(f"{path}: record {number}: bad JSON ({e.msg} at column {e.colno}); every line "
                                   "is one JSON list of messages") from None
            if not isinstance(messages, list):
                raise EvotuneError(f"{path}: record {number}: a line is one JSON list of messages "
                                   f"(found {type(messages).__name__})")
            yield path, number, {"messages": messages}


def load_intern_repo_untokenized_dataset(processed_dataset_dict_path=None, folder=None, tokenizer=None,
                                         max_length: int | None = None, template_map_fn=None,
                                         data_order_path=None, file_type: str = ".json") -> FtdpFolder:
    """XTuner's untokenized InternEvo data: every ``file_type`` file of ``folder`` (one JSON list of messages per
    line) is mapped with ``openai_map_fn``, templated, tokenized (documents cut at ``max_length``) and cached as
    one tokenized file at the same place; the result is read like ``load_intern_repo_tokenized_dataset``'s
    (same file order rules, top-level folders are the data types), so ``build_packed_dataset`` packs it.

    ``processed_dataset_dict_path``: a ``DatasetDict`` XTuner saved (``input_ids``/``labels`` per split,
    splits in numeric order), converted the same way.
    """
    where = "load_intern_repo_untokenized_dataset"
    if processed_dataset_dict_path is not None:
        return _processed_dict(os.fspath(processed_dataset_dict_path), where)
    if folder is None or tokenizer is None or max_length is None:
        raise EvotuneError(f"{where}: give folder, tokenizer and max_length (or processed_dataset_dict_path)")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise EvotuneError(f"{where}: folder {folder} does not exist or is not a folder")
    rels = (read_data_order(folder, os.fspath(data_order_path), file_type) if data_order_path is not None
            else walk_data_files(folder, file_type))
    if not rels:
        raise EvotuneError(f"{where}: folder {folder} has no '*{file_type}' file")
    max_length = int(max_length)
    encoder = Encoder.of(tokenizer)
    template_fn = build(template_map_fn) if isinstance(template_map_fn, dict) else template_map_fn
    outputs = [rel[: -len(file_type)] + ".bin" for rel in rels]
    key = {"kind": "untokenized", "data": _file_key([os.path.join(folder, r) for r in rels]), "rels": rels,
           "tokenizer": encoder.key, "template_map_fn": _function_key(template_fn), "max_length": max_length}

    def write(tmp: str) -> _Stats:
        total = _Stats()
        recipe = _Recipe(encoder, X.openai_map_fn, template_fn)
        for rel, out in zip(rels, outputs):
            stats = _tokenize_records(_json_line_records(os.path.join(folder, rel)), os.path.join(tmp, out),
                                      recipe, max_length, workers=XTUNER_MAP_NUM_PROC)
            total.add(stats)
        return total

    entry, stats = _cached(key, write)
    _say(stats, f"{where} {folder}", entry)
    written = [out for out in outputs if os.path.isfile(os.path.join(entry, out))]
    if not written:
        raise EvotuneError(f"{where}: no record of {folder} has a trained token ({stats['records']} records)")
    return load_files(entry, written)


def _processed_dict(path: str, where: str) -> FtdpFolder:
    import datasets  # only this XTuner-saved form needs it (its import takes seconds)

    if not os.path.isdir(path):
        raise EvotuneError(f"{where}: processed_dataset_dict_path {path} does not exist")
    saved = datasets.load_from_disk(path)
    names = sorted(saved, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))  # XTuner: int
    files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs)
    key = {"kind": "processed", "data": _file_key(files), "splits": names}

    def write(tmp: str) -> _Stats:
        total = _Stats()
        for name in names:
            stats = _tokenize_records(_dataset_records(saved[name], f"{path} [{name}]"),
                                      os.path.join(tmp, f"{_safe(name)}.bin"), _Recipe(None, tokenized=True), None)
            total.add(stats)
        return total

    entry, stats = _cached(key, write)
    _say(stats, f"{where} {path}", entry)
    written = [f"{_safe(n)}.bin" for n in names if os.path.isfile(os.path.join(entry, f"{_safe(n)}.bin"))]
    if not written:
        raise EvotuneError(f"{where}: {path} holds no document with a trained token")
    return load_files(entry, written)
