"""Throughput of ``evotune tokenize`` (documents/s and tokens/s) with 1 and 2 workers.

Generates a deterministic JSON-lines input (text records, or chat records
rendered with internlm2_chat) split over several files, tokenizes it with the
real InternLM2 sentencepiece model, and prints one table row per worker count.
CPU time (this process plus the pool's workers) is printed too: on a shared
machine, tokens per CPU-second is the figure that does not depend on the load.

    python bench/tokenize_throughput.py --records 300000 --files 4 --format text
    python bench/tokenize_throughput.py --records 300000 --files 4 --format chat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from evotune.data.tokenize import tokenize_files

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WORDS = ("the of and to in is was for on that with as by it at from his an were are which this be or has had "
         "data model training token language we our results table figure method performance 模型 训练 数据 "
         "the quick brown fox jumps over lazy dog 2024 3.14 (see above) e.g. naïve café").split()


def generate(folder: Path, records: int, files: int, fmt: str, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    paths = []
    per_file = -(-records // files)
    for k in range(files):
        path = folder / f"part-{k:02d}.jsonl"
        n = min(per_file, records - k * per_file)
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                text = " ".join(words[rng.integers(0, len(words), rng.integers(20, 160))])
                if fmt == "text":
                    rec = {"text": text}
                else:
                    cut = len(text) // 3
                    rec = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                        {"role": "user", "content": text[:cut]},
                                        {"role": "assistant", "content": text[cut:]}]}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=300_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--format", choices=("text", "chat"), default="text")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "internlm2.model"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="evotune-bench-"))
    try:
        t = time.perf_counter()
        (tmp / "raw").mkdir()
        inputs = generate(tmp / "raw", args.records, args.files, args.format)
        size = sum(os.path.getsize(x) for x in inputs)
        print(f"input: {args.records:,} {args.format} records in {args.files} files, {size / 2**20:.0f} MiB "
              f"(generated in {time.perf_counter() - t:.0f} s); cpus: {os.cpu_count()}")
        print("| workers | wall s | documents/s | tokens/s | MiB/s | CPU s | tokens per CPU-second | load avg |")
        print("|---|---|---|---|---|---|---|---|")
        for w in args.workers:
            out = tmp / f"out-w{w}"
            cpu0 = _cpu_seconds()
            t = time.perf_counter()
            stats = tokenize_files(inputs, out, args.tokenizer, fmt=args.format,
                                   template="internlm2_chat" if args.format == "chat" else None,
                                   workers=w, progress=False)
            dt = time.perf_counter() - t
            cpu = _cpu_seconds() - cpu0
            docs, tokens = stats.docs["train"], stats.tokens["train"]
            print(f"| {w} | {dt:.1f} | {docs / dt:,.0f} | {tokens / dt:,.0f} | {size / 2**20 / dt:.1f} | {cpu:.1f} "
                  f"| {tokens / cpu:,.0f} | {os.getloadavg()[0]:.1f} |", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
