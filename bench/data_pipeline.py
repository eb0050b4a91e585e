"""Data pipeline benchmark: cold index speed and warm pack iteration vs reading documents with json.loads.

    python bench/data_pipeline.py                  # 200M tokens (~1.3 GB of .bin) under /tmp, deleted after
    python bench/data_pipeline.py --tokens 20e6    # a quick run

Steps: write a synthetic InternEvo folder (documents of lognormal length, ids
below 92,544, 10% negative); index it cold (the ``.bin`` files evicted from the
page cache with ``posix_fadvise``, then again from the page cache), pinned to
one core; iterate packs in the sampler's order from the warm index; and time
two baselines that read every document with ``json.loads`` at access time, as
XTuner's and InternEvo's ``JsonlDataset`` do: (a) packs assembled with Python
lists as their ``PackedDataset`` does, (b) the same reads feeding evotune's numpy
packing. Both baselines are checked to produce exactly evotune's packs. Not a
test: run it by hand and record the numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotune.data.ftdp import load_intern_repo_tokenized_dataset  # noqa: E402
from evotune.data.packing import IGNORE, build_packed_dataset  # noqa: E402
from evotune.data.sampler import InternRepoSampler  # noqa: E402

VOCAB = 92544


def write_folder(root: Path, total_tokens: int, n_files: int, seed: int = 0) -> int:
    """Write ``n_files`` .bin/.bin.meta files of ``total_tokens`` tokens in all; returns bytes written.

    Lines come from a pool of 20,000 distinct documents drawn at random (encoding
    200M tokens with json.dumps one by one would dominate the run).
    """
    rng = np.random.default_rng(seed)
    pool, pool_len = [], []
    for _ in range(20000):
        n = int(np.clip(rng.lognormal(6.2, 1.0), 16, 16384))
        doc = rng.integers(0, VOCAB, n)
        doc[rng.random(n) < 0.1] *= -1
        pool.append((json.dumps({"tokens": doc.tolist()}) + "\n").encode())
        pool_len.append(n)
    size = 0
    per_file = total_tokens // n_files + 1
    for i in range(n_files):
        path = root / ("en" if i % 2 else "cn") / f"part{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows, offset, tokens = [], 0, 0
        with open(path, "wb") as f:
            while tokens < per_file:
                j = int(rng.integers(len(pool)))
                f.write(pool[j])
                rows.append((offset, pool_len[j]))
                offset += len(pool[j])
                tokens += pool_len[j]
            f.flush()
            os.fsync(f.fileno())
        with open(str(path) + ".meta", "wb") as f:
            np.save(f, np.asarray(rows, dtype=np.int64))
        size += offset
    return size


def evict(root: Path) -> None:
    """Drop the .bin files from the page cache (clean pages; no root needed)."""
    for path in root.rglob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Timer:
    """Wall-clock and CPU seconds of this process (CPU time is what one core spent, whatever the load)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_index(root: Path, cache: Path) -> Timer:
    os.environ["EVOTUNE_CACHE"] = str(cache)
    with Timer() as t:
        load_intern_repo_tokenized_dataset(root)
    return t


class JsonReader:
    """Documents by seek + readline + json.loads, as XTuner/InternEvo's JsonlDataset reads them."""

    def __init__(self, ds):
        self.maps, self.offsets = {}, {}
        for f in ds.folder.files:
            fh = open(f.path, "rb")
            self.maps[f.path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self.offsets[f.path] = np.load(open(f.path + ".meta", "rb"))[:, 0].tolist()

    def __call__(self, path: str, row: int) -> list[int]:
        mm = self.maps[path]
        mm.seek(self.offsets[path][row])
        return json.loads(mm.readline())["tokens"]


def _fragments(ds, index: int):
    fi = ds.file_of_pack(index)
    plan, k, P = ds.plans[fi], index - int(ds.pack_offsets[fi]), ds.packed_length
    out = []
    for d in range(int(plan.first_doc[k]), int(plan.last_doc[k]) + 1):
        row = int(plan.doc_rows[d])
        start = int(plan.doc_ends[d]) - int(plan.file.lengths[row])
        out.append((plan.file, row, max(k * P - start, 0), min((k + 1) * P - start, int(plan.file.lengths[row]))))
    return out


def baseline_lists(ds, index: int, read) -> dict:
    """(a) InternEvo/XTuner's PackedDataset.build_pack: json per document, Python lists, cut mode."""
    L = ds.max_length_per_sample
    pack, labels, cu, pos, types = [], [], [0], [], []
    for f, row, a, b in _fragments(ds, index):
        tokens = read(f.path, row)
        chunk = tokens[a:b]
        pack.extend(chunk)
        labels.extend(list(chunk[1:]) + [tokens[b] if b < len(tokens) else IGNORE])
        types.extend([f.type_id] * len(chunk))
        full, rest = divmod(len(chunk), L)
        for _ in range(full):
            cu.append(cu[-1] + L)
            pos.extend(range(L))
        if rest:
            cu.append(cu[-1] + rest)
            pos.extend(range(rest))
    return {"input_ids": np.array([abs(t) for t in pack], dtype=np.int64),
            "labels": np.array([t if t > 0 else IGNORE for t in labels], dtype=np.int64),
            "position_ids": np.array(pos, dtype=np.int64), "cu_seqlens": np.array(cu, dtype=np.int32),
            "type_ids": np.array(types, dtype=np.int64)}


class JsonTokens:
    """Stands in for a file's token index in evotune's packing: every slice is a json.loads."""

    def __init__(self, f, read):
        self.f, self.read = f, read
        self.row_of = {int(s): r for r, s in enumerate(f.row_start)}

    def __getitem__(self, item):
        if isinstance(item, slice):
            row = self.row_of.get(item.start)
            if row is None:  # a slice from inside a document
                row = int(np.searchsorted(self.f.row_start, item.start, side="right")) - 1
            base = int(self.f.row_start[row])
            return np.array(self.read(self.f.path, row)[item.start - base:item.stop - base], dtype=np.int32)
        index = np.atleast_1d(np.asarray(item, dtype=np.int64))  # an index gather: one read per document
        rows = np.searchsorted(self.f.row_start, index, side="right") - 1
        out = np.empty(len(index), dtype=np.int32)
        for row in np.unique(rows).tolist():
            at = rows == row
            out[at] = np.asarray(self.read(self.f.path, row), dtype=np.int32)[index[at] - int(self.f.row_start[row])]
        return out if np.ndim(item) else out[0]


def best_run(get, indices, repeats: int) -> Timer:
    """The fastest of ``repeats`` passes (wall and CPU taken from the same pass)."""
    runs = []
    for _ in range(repeats):
        with Timer() as t:
            for i in indices:
                get(i)
        runs.append(t)
    return min(runs, key=lambda t: t.wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=200e6)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--packed-length", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=4096, help="max_length_per_sample")
    parser.add_argument("--packs", type=int, default=2000, help="packs timed for evotune")
    parser.add_argument("--baseline-packs", type=int, default=100, help="packs timed for each baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic folder")
    args = parser.parse_args()

    core = args.core if args.core is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    work = Path(tempfile.mkdtemp(prefix="evotune-bench-", dir=args.dir))
    root = work / "data"
    try:
        t0 = time.perf_counter()
        size = write_folder(root, int(args.tokens), args.files)
        print(f"wrote {size / 1e6:.0f} MB of .bin in {time.perf_counter() - t0:.0f} s", flush=True)

        evict(root)
        disk = time_index(root, work / "cache-disk")
        page = time_index(root, work / "cache-page")  # the .bin pages are now cached
        folder = load_intern_repo_tokenized_dataset(root)  # warm: maps the cache built last
        for name, t in ((".bin from disk", disk), (".bin from page cache", page)):
            print(f"cold index, {name:21s} {t.wall:6.1f} s wall {size / 1e6 / t.wall:6.0f} MB/s; "
                  f"{t.cpu:6.1f} s CPU {size / 1e6 / t.cpu:6.0f} MB per CPU-second")
        print(f"{folder.num_tokens / 1e6:.0f}M tokens in {len(folder.files)} files", flush=True)

        ds = build_packed_dataset(folder, args.packed_length, max_length_per_sample=args.seq_len)
        stream = iter(InternRepoSampler(ds))
        order = [next(stream) for _ in range(min(args.packs, len(ds)))]
        P = ds.packed_length
        best_run(ds.__getitem__, order, 1)  # bring the pages in: warm
        ours = best_run(ds.__getitem__, order, args.repeats)

        read = JsonReader(ds)
        sub = order[:args.baseline_packs]
        json_ds = build_packed_dataset(folder, args.packed_length, max_length_per_sample=args.seq_len)
        for plan in json_ds.plans:
            plan.file = type(plan.file)(**{**plan.file.__dict__, "tokens": JsonTokens(plan.file, read)})
        for i in sub[:20]:  # the baselines build exactly evotune's packs
            ref = ds[i]
            for other in (baseline_lists(ds, i, read), json_ds[i]):
                assert all(np.array_equal(ref[k], other[k]) for k in ref), f"baseline differs at pack {i}"
        lists = best_run(lambda i: baseline_lists(ds, i, read), sub, args.repeats)
        numpy_json = best_run(json_ds.__getitem__, sub, args.repeats)

        def rate(t: Timer, n: int) -> str:
            return f"{n * P / t.wall / 1e6:7.1f} M tokens/s wall, {n * P / t.cpu / 1e6:7.1f} per CPU-second"

        print(f"warm packs (P={P}, seq_len={args.seq_len}), sampler order, one core, best of {args.repeats}:")
        print(f"  evotune (memory-mapped index):          {rate(ours, len(order))}  ({len(order)} packs)")
        for name, t in (("a: json.loads + Python lists: ", lists), ("b: json.loads + numpy packing:", numpy_json)):
            print(f"  baseline {name} {rate(t, len(sub))}  ({len(sub)} packs) -> evotune "
                  f"{(len(order) / ours.wall) / (len(sub) / t.wall):.0f}x wall, "
                  f"{(len(order) / ours.cpu) / (len(sub) / t.cpu):.0f}x CPU")
        print(f"  load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
