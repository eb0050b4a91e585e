"""InternEvo's packing: per-file shuffle, fixed-length packs, labels and positions.

Each file is packed on its own (docs/data.md, "Packing"): its kept documents are shuffled
with ``RandomState(1024)`` (fixed, whatever the config seed), concatenated, and
cut into ``floor(tokens / packed_length)`` packs; the packs of all files are
concatenated in walk order. Only per-pack document ranges are precomputed (one
vectorised ``searchsorted`` per file); a pack's arrays are gathered from the
memory-mapped token index when it is read.

Two modes, as InternEvo's ``PackedDatasetWithCut`` / ``PackedDatasetWithoutCuSeqlen``:

* ``pack_sample_into_one=False``: every document fragment in a pack is split from
  its own start into ``max_length_per_sample`` pieces (plus a remainder); each
  piece is a ``cu_seqlens`` segment with positions 0..n-1. A label is the next
  token of the same document, -100 at a document's end; at the pack cut it is
  the document's next token (which the next pack sees as input).
* ``pack_sample_into_one=True``: segments on a fixed grid of
  ``max_length_per_sample``; the label is -100 at every fragment's end, the pack
  end included.

Then inputs are ``abs(token)`` and any label that is not positive becomes -100
(a negative id is input only; token 0 is never a target, as in InternEvo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from evotune.data.ftdp import FtdpFile, FtdpFolder, load_files, walk_data_files
from evotune.errors import EvotuneError

FILE_SHUFFLE_SEED = 1024  # InternEvo's DEFAULT_SEED for the per-file document shuffle
IGNORE = -100
_SLICE_LIMIT = 64  # fragments per pack up to which slices are concatenated


def _build(spec):
    """Build a ``type=`` dict (the config's ``build``), or pass a built folder through."""
    if isinstance(spec, dict) and "type" in spec:
        from evotune.config import build

        return build(spec)
    return spec


@dataclass
class _FilePacks:
    """One file's packing plan: shuffled documents and each pack's document range."""

    file: FtdpFile
    doc_rows: np.ndarray  # meta rows in shuffled order
    doc_ends: np.ndarray  # cumulative token count after each shuffled document
    first_doc: np.ndarray  # per pack: index (into doc_rows) of the document holding its first token
    last_doc: np.ndarray  # per pack: index of the document holding its last token


def _plan_file(f: FtdpFile, packed_length: int, shuffle: bool = True) -> _FilePacks:
    order = np.arange(len(f.kept))
    if shuffle:
        np.random.RandomState(FILE_SHUFFLE_SEED).shuffle(order)
    doc_rows = f.kept[order]
    doc_ends = np.cumsum(f.lengths[doc_rows], dtype=np.int64)
    n_packs = int(doc_ends[-1]) // packed_length if len(doc_ends) else 0
    starts = np.arange(n_packs, dtype=np.int64) * packed_length
    first = np.searchsorted(doc_ends, starts, side="right")
    last = np.searchsorted(doc_ends, starts + packed_length, side="left")
    return _FilePacks(f, doc_rows, doc_ends, first, last)


class PackedDataset:
    """Packs of a training folder; ``ds[i]`` is a dict of numpy arrays (see module doc).

    Keys: ``input_ids``, ``labels``, ``position_ids``, ``type_ids`` (int64, length
    ``packed_length``) and ``cu_seqlens`` (int32, from 0 to ``packed_length``).
    ``seed`` is the sampler's default seed; ``mixing`` the ``dataset_weights`` plan;
    ``shuffle_documents=False`` packs each file's documents in file order (XTuner's
    ``shuffle_before_pack=False``, evotune/data/hf_dataset.py).
    """

    def __init__(self, folder: FtdpFolder, packed_length: int, seed: int = 1024,
                 max_length_per_sample: int | None = None, pack_sample_into_one: bool = False,
                 dataset_weights: dict | None = None, shuffle_documents: bool = True):
        if int(packed_length) <= 0:
            raise EvotuneError(f"packed_length must be a positive number of tokens, got {packed_length}")
        self.packed_length = int(packed_length)
        self.max_length_per_sample = int(max_length_per_sample or packed_length)
        if self.max_length_per_sample <= 0:
            raise EvotuneError(f"max_length_per_sample must be positive, got {max_length_per_sample}")
        if pack_sample_into_one and self.packed_length % self.max_length_per_sample:
            raise EvotuneError(f"pack_sample_into_one=True needs packed_length ({self.packed_length}) to be a "
                               f"multiple of max_length_per_sample ({self.max_length_per_sample})")
        self.pack_sample_into_one = bool(pack_sample_into_one)
        self.seed = seed
        self.folder = folder
        self.type_names = list(folder.type_names)
        self.max_token_id = folder.max_token_id
        self.plans = [_plan_file(f, self.packed_length, shuffle_documents) for f in folder.files]
        self.pack_offsets = np.concatenate([[0], np.cumsum([len(p.first_doc) for p in self.plans])]).astype(np.int64)
        self._arange = np.arange(self.packed_length, dtype=np.int64)
        L = self.max_length_per_sample
        self._grid_cu = np.arange(0, self.packed_length + 1, L, dtype=np.int32)
        self._grid_pos = self._arange % L
        self.mixing = None
        if dataset_weights:
            from evotune.data.mixing import Mixing

            self.mixing = Mixing(self, dataset_weights, seed)

    def __len__(self) -> int:
        return int(self.pack_offsets[-1])

    def file_of_pack(self, index: int) -> int:
        """Index into ``plans`` (and ``folder.files``) of the file holding global pack ``index``."""
        return int(np.searchsorted(self.pack_offsets, index, side="right")) - 1

    def check_vocab_size(self, vocab_size: int) -> None:
        self.folder.check_vocab_size(vocab_size)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pack {index} out of range ({len(self)} packs)")
        fi = self.file_of_pack(index)
        return self._pack(self.plans[fi], index - int(self.pack_offsets[fi]))

    def _pack(self, plan: _FilePacks, k: int) -> dict[str, np.ndarray]:
        P = self.packed_length
        f = plan.file
        d0, d1 = int(plan.first_doc[k]), int(plan.last_doc[k]) + 1
        rows = plan.doc_rows[d0:d1]
        doc_len = f.lengths[rows]
        doc_start = plan.doc_ends[d0:d1] - doc_len  # stream position of each document's first token
        frag_a = np.maximum(k * P - doc_start, 0)  # fragment = doc tokens [frag_a, frag_b)
        frag_b = np.minimum((k + 1) * P - doc_start, doc_len)
        frag_len = frag_b - frag_a
        src = f.row_start[rows] + frag_a  # where each fragment starts in the token index
        frag_pos = np.cumsum(frag_len) - frag_len  # where each fragment starts in the pack
        # One block for the four int64 rows: a single large allocation, and no temporaries of P int64,
        # keeps the allocator from handing fresh pages (page faults cost more than the packing).
        out = np.empty((4, P), dtype=np.int64)
        input_ids, labels, position_ids, type_ids = out
        if len(rows) <= _SLICE_LIMIT:  # few fragments: contiguous copies beat an index gather
            input_ids[:] = np.concatenate([f.tokens[s:s + n] for s, n in zip(src.tolist(), frag_len.tolist())])
        else:
            input_ids[:] = f.tokens[np.repeat(src - frag_pos, frag_len) + self._arange]

        labels[:-1] = input_ids[1:]
        labels[(frag_pos + frag_len - 1)[frag_len > 0]] = IGNORE  # every fragment's last token
        if not self.pack_sample_into_one and frag_b[-1] < doc_len[-1]:
            labels[-1] = f.tokens[src[-1] + frag_len[-1]]  # cut: the document's next token
        np.putmask(labels, labels <= 0, IGNORE)
        np.abs(input_ids, out=input_ids)
        type_ids.fill(f.type_id)

        if self.pack_sample_into_one:
            cu_seqlens = self._grid_cu.copy()
            position_ids[:] = self._grid_pos
        else:
            L = self.max_length_per_sample
            seg_len = frag_len[frag_len > 0]
            if seg_len.max() > L:  # split long fragments into L-token pieces and a remainder
                full, rest = np.divmod(seg_len, L)
                n_seg = full + (rest > 0)
                seg_len = np.full(int(n_seg.sum()), L, dtype=np.int64)
                seg_len[(np.cumsum(n_seg) - 1)[rest > 0]] = rest[rest > 0]
            cu = np.zeros(len(seg_len) + 1, dtype=np.int64)
            np.cumsum(seg_len, out=cu[1:])
            cu_seqlens = cu.astype(np.int32)
            # positions: +1 per token, dropping back to 0 at each segment start
            position_ids.fill(1)
            position_ids[cu[1:-1]] = 1 - seg_len[:-1]
            position_ids[0] = 0
            np.cumsum(position_ids, out=position_ids)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "cu_seqlens": cu_seqlens, "type_ids": type_ids}


def build_packed_dataset(dataset_cfg, packed_length: int, seed: int = 1024, max_length_per_sample: int | None = None,
                         pack_sample_into_one: bool = False, dataset_weights: dict | None = None) -> PackedDataset:
    """InternEvo's packed dataset over a built folder or a ``type=load_intern_repo_tokenized_dataset`` dict."""
    folder = _build(dataset_cfg)
    if not isinstance(folder, FtdpFolder):
        raise EvotuneError(f"build_packed_dataset: dataset_cfg must build an InternEvo folder "
                           f"(type=load_intern_repo_tokenized_dataset), got {type(folder).__name__}")
    return PackedDataset(folder, packed_length, seed, max_length_per_sample, pack_sample_into_one, dataset_weights)


def build_valid_datasets(valid_folder, packed_length: int, max_length_per_sample: int | None = None,
                         pack_sample_into_one: bool = False, min_length: int = 0) -> dict[str, PackedDataset]:
    """One packed validation set per folder that holds data files, named by its path under ``valid_folder``.

    (InternEvo names a set by the folder's base name; the relative path cannot
    collide.) Files directly in ``valid_folder`` form a set named after it. Each
    set is packed like training data, so its last ``< packed_length`` tokens per
    file are not evaluated; a set with no full pack is an error.
    """
    valid_folder = os.fspath(valid_folder)
    if not os.path.isdir(valid_folder):
        raise EvotuneError(f"valid_folder {valid_folder} does not exist or is not a folder")
    groups: dict[str, list[str]] = {}
    for rel in walk_data_files(valid_folder):
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        groups.setdefault(parent, []).append(rel)
    if not groups:
        raise EvotuneError(f"valid_folder {valid_folder} has no '*.bin' file")
    out = {}
    for parent, rels in groups.items():
        name = parent or os.path.basename(os.path.normpath(valid_folder))
        sub = os.path.join(valid_folder, parent) if parent else valid_folder
        folder = load_files(sub, [r.rsplit("/", 1)[-1] for r in rels], min_length)
        ds = PackedDataset(folder, packed_length, max_length_per_sample=max_length_per_sample,
                           pack_sample_into_one=pack_sample_into_one)
        if len(ds) == 0:
            raise EvotuneError(f"valid_folder {sub}: {folder.num_tokens} tokens, fewer than one pack of "
                               f"{packed_length}; add data or lower max_length")
        out[name] = ds
    return out
