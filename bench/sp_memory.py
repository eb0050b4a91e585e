"""Sequence-parallel memory: peak memory per rank of one training micro-step, SP=1 vs SP=2, on CPU.

    python bench/sp_memory.py                                 # about 4 minutes on 2 shared cores
    python bench/sp_memory.py --lengths 16384,65536 --sp 1,2,4

For each SP size and packed length, SP gloo processes (one plain process for
SP=1) each build the same tiny Llama (hidden 64, 2 layers, 4 query / 2 kv heads,
fp32, activation checkpointing on, as evotune trains), take their chunk of one
packed row of documents (``shard_row``), and run forward + backward once. Each
rank's peak memory above its state before the step is measured (see
``bench/peak_memory.py``: on CPU the peak RSS with freed tensors returned to the
OS); the table shows the largest over the ranks. What this covers: activations
saved for backward, the recomputed layer's activations, attention workspaces
(per document: the whole sequence of heads / sp heads under SP), the all-to-all
buffers and the loss chunks; the weights, their gradients and optimizer state
are allocated before and are not counted (a few MB for this model).

Everything in the step is proportional to the packed length once documents
have a fixed length, so a linear fit per SP size gives the largest packed
length whose step fits in a memory budget (``--budget-gb``, default 20): an
extrapolation, printed with the fit's residual; no run at that length is made
(it would need the whole machine). Not a test: run it by hand and record the
numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import PeakMemory  # noqa: E402

from evotune.data.collate import packed_collate  # noqa: E402
from evotune.model.finetune import SupervisedFinetune  # noqa: E402
from evotune.parallel.ulysses import shard_row  # noqa: E402

GB = 1e9
MODEL_KEYS = ("input_ids", "position_ids", "loss_index", "loss_labels", "loss_weight",
              "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _row(length: int, doc_length: int, vocab: int, seed: int) -> dict:
    """One packed row of ``length`` tokens: documents of ``doc_length`` tokens (the last one shorter)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, length)
    starts = np.arange(0, length, doc_length)
    cu = np.append(starts, length).astype(np.int32)
    labels = np.append(ids[1:], -100)
    labels[cu[1:-1] - 1] = -100  # each document's last token predicts nothing
    position_ids = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    pack = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu,
            "type_ids": np.zeros(length, dtype=np.int64)}
    return packed_collate([pack], "pack")


def _model(vocab: int, layers: int) -> SupervisedFinetune:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
                         tie_word_embeddings=False)
    return SupervisedFinetune(LlamaForCausalLM(config), use_varlen_attn=True, activation_checkpointing=True)


def _step(rank: int, sp: int, args, length: int) -> tuple[int, float, float]:
    """Forward + backward of this rank's chunk; returns (peak bytes, seconds, loss share)."""
    torch.set_num_threads(1 if sp > 1 else args.threads)
    group = None
    if sp > 1:
        group = dist.new_group(list(range(sp)))
    model = _model(args.vocab, args.layers)
    batch = shard_row(_row(length, args.doc_length, args.vocab, seed=length), rank, sp)
    inputs = {k: batch[k] for k in MODEL_KEYS}
    if group is not None:
        inputs["sp_group"] = group
    with PeakMemory("cpu") as pm:
        t = time.perf_counter()
        loss = model(**inputs)
        loss.backward()
        seconds = time.perf_counter() - t
        value = float(loss.detach())
        del loss
    return pm.peak_bytes, seconds, value


def _worker(rank: int, sp: int, args, length: int, store: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=sp)
    try:
        peak, seconds, value = _step(rank, sp, args, length)
        stats = torch.tensor([peak, seconds, value], dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(sp)]
        dist.all_gather(gathered, stats)
        if rank == 0:
            torch.save(torch.stack(gathered), result_file)
    finally:
        dist.destroy_process_group()


def measure(sp: int, args, length: int) -> tuple[float, float, float]:
    """(max peak bytes over ranks, max seconds, row loss) for one SP size and packed length."""
    if sp == 1:
        peak, seconds, value = _step(0, 1, args, length)
        return float(peak), seconds, value
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(sp, args, length, os.path.join(tmp, "store"), result), nprocs=sp, join=True)
        stats = torch.load(result)
    return float(stats[:, 0].max()), float(stats[:, 1].max()), float(stats[:, 2].sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="32768,65536,131072", help="packed lengths to measure (comma separated)")
    p.add_argument("--sp", default="1,2", help="sequence-parallel sizes (comma separated)")
    p.add_argument("--doc-length", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads for SP=1 (SP ranks use one each)")
    p.add_argument("--budget-gb", type=float, default=20.0)
    args = p.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    sizes = [int(x) for x in args.sp.split(",")]

    print(f"# SP memory: tiny Llama hidden 64, {args.layers} layers, 4 q / 2 kv heads, vocab {args.vocab}, fp32, "
          f"activation checkpointing, documents of {args.doc_length} tokens, CPU gloo")
    print(f"# peak memory per rank = {PeakMemory('cpu').method}; max over ranks")
    print()
    print("| SP | packed length | peak per rank | bytes / packed token | time (s) | row loss |")
    print("|---:|---:|---:|---:|---:|---:|")
    fits = {}
    for sp in sizes:
        points = []
        for n in lengths:
            peak, seconds, value = measure(sp, args, n)
            points.append((n, peak))
            print(f"| {sp} | {n} | {peak / GB:.3f} GB | {peak / n:.0f} | {seconds:.1f} | {value:.5f} |", flush=True)
        xs, ys = np.array([n for n, _ in points], float), np.array([b for _, b in points], float)
        slope, intercept = np.polyfit(xs, ys, 1) if len(xs) > 1 else (ys[0] / xs[0], 0.0)
        residual = float(np.max(np.abs(slope * xs + intercept - ys))) if len(xs) > 2 else None
        fits[sp] = (slope, intercept, residual)
    print()
    for sp, (slope, intercept, residual) in fits.items():
        largest = (args.budget_gb * GB - intercept) / slope
        res = f", fit residual {residual / GB:.3f} GB" if residual is not None else ""
        print(f"SP={sp}: {slope:.0f} bytes per packed token per rank (+{intercept / GB:.3f} GB){res}; "
              f"largest packed length in {args.budget_gb:g} GB per rank (extrapolated): {largest / 1e6:.2f}M tokens")
    base = fits[sizes[0]][0]
    for sp in sizes[1:]:
        print(f"activation memory per token per rank, SP={sp} / SP={sizes[0]}: {fits[sp][0] / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
