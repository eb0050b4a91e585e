"""Training throughput: evotune packed + varlen vs packed without varlen vs plain transformers.

    python bench/train_throughput.py        # CPU, tiny model, under 2 minutes on 2 cores
    python bench/train_throughput.py --device cuda --model llama-1b --packed-length 16384 [--compile] [--profile]

Three ways to train the same documents, one optimizer step per pack:

(a) evotune: the pack's documents in one row; ``SupervisedFinetune`` with
    varlen attention (``cu_seqlens``, max length and supervised-token indices
    prepared by ``packed_collate`` on the host) and the chunked loss over the
    supervised tokens only.
(b) the same with ``use_varlen_attn=False``: plain causal attention over the
    whole row (documents see each other, positions 0..P-1).
(c) plain transformers: one document per row, padded to the longest of its
    micro-batch, SDPA attention with the padding mask, labels -100 on padding
    and prompt tokens, the model's own loss (full logits). The pack's documents
    are taken in order into micro-batches of at most ``packed_length`` padded
    tokens (the memory budget of one pack) and accumulated into one optimizer
    step with ``num_items_in_batch`` = the step's supervised tokens (as the HF
    Trainer does), so (c) optimises exactly (a)'s objective: their losses agree.

Same model (same seed and initialisation), same optimizer (AdamW, fused kernel
where one exists), same precision, same activation checkpointing, gradient
clipping at 1.0; ``--compile`` compiles the decoder layers of (a) and (b) only,
(c) stays plain transformers.

Data: log-normal document lengths (median 600 x s, sigma 1, at most
``packed_length``) with s = packed_length / 16384, so a 16k run has median ~600
and a tail to 16k, and the 1024-token CPU run the same shape scaled by 1/16;
the first 30% of each document is prompt (no loss). Documents are cut at pack
boundaries as InternEvo packs them, and the pieces are the documents of all
three paths: identical real tokens and identical model FLOPs.

Measured: warm-up steps excluded; per-step time from CUDA events recorded
between steps (no synchronisation between steps), or on CPU the process's CPU
time with one intra-op thread (``--threads 1``: on a shared, oversubscribed
machine OpenMP threads spin against each other and wall time is mostly other
people's load; ``--cpu-clock wall`` for the wall clock);
real tokens/s = the step's real tokens / its time, median over steps; MFU =
model FLOPs on the real document lengths (``evotune.train.metrics.model_flops``)
/ step time / peak; peak memory over model build and all steps (see
``bench/peak_memory.py``); on CUDA also the host synchronisations of one step
(``torch.cuda.set_sync_debug_mode``). Batches are collated and pinned before
timing (what a prefetching loader gives) and copied with ``non_blocking=True``
inside the step. Not a test: run it by hand and record the output in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import PeakMemory  # noqa: E402

from evotune.data.collate import model_inputs, packed_collate  # noqa: E402
from evotune.model.checkpointing import AC_MODES, set_activation_checkpointing  # noqa: E402
from evotune.model.compile import compile_decoder_layers  # noqa: E402
from evotune.model.finetune import SupervisedFinetune  # noqa: E402
from evotune.train import metrics as M  # noqa: E402
from evotune.train.optim import build_optimizer  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096),
    # TinyLlama-1.1B's shape, random initialisation
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     intermediate_size=5632, vocab_size=32000),
}
PAD_ID = 0


# ----------------------------------------------------------------------------- data

@dataclass
class Doc:
    ids: np.ndarray  # token ids
    target: np.ndarray  # bool: token i is predicted (from token i-1) and trained on


def make_packs(n_packs: int, packed_length: int, vocab: int, seed: int, median: float = 600.0,
               sigma: float = 1.0, prompt_fraction: float = 0.3) -> list[list[Doc]]:
    """Documents of log-normal length, cut at pack boundaries into ``n_packs`` full packs."""
    rng = np.random.default_rng(seed)
    scale = packed_length / 16384
    packs, current, room = [], [], packed_length
    while len(packs) < n_packs:
        n = int(np.clip(round(rng.lognormal(np.log(median * scale), sigma)), 2, packed_length))
        ids = rng.integers(3, vocab, n)
        target = np.arange(n) >= max(1, int(prompt_fraction * n))
        while len(ids) and len(packs) < n_packs:
            take = min(len(ids), room)
            current.append(Doc(ids[:take], target[:take]))
            ids, target, room = ids[take:], target[take:], room - take
            if room == 0:
                packs.append(current)
                current, room = [], packed_length
    return packs


def packed_batch(docs: list[Doc], pin: bool) -> dict:
    """(a)/(b): the pack as ``PackedDataset`` yields it, through evotune's ``packed_collate``."""
    labels = []
    for d in docs:
        lab = np.full(len(d.ids), -100, dtype=np.int64)
        lab[:-1] = np.where(d.target[1:], d.ids[1:], -100)
        labels.append(lab)
    pack = {
        "input_ids": np.concatenate([d.ids for d in docs]),
        "labels": np.concatenate(labels),
        "position_ids": np.concatenate([np.arange(len(d.ids)) for d in docs]),
        "type_ids": np.zeros(sum(len(d.ids) for d in docs), dtype=np.int64),
        "cu_seqlens": np.concatenate([[0], np.cumsum([len(d.ids) for d in docs])]).astype(np.int32),
    }
    batch = packed_collate([pack], "pack")
    if pin:
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def padded_micro_batches(docs: list[Doc], budget: int, pin: bool) -> list[dict]:
    """(c): documents in order, one per row, padded to the longest; at most ``budget`` padded tokens each."""
    groups, current, longest = [], [], 0
    for d in docs:
        if current and (len(current) + 1) * max(longest, len(d.ids)) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(d)
        longest = max(longest, len(d.ids))
    groups.append(current)
    n_targets = int(sum(d.target[1:].sum() for d in docs))
    out = []
    for group in groups:
        width = max(len(d.ids) for d in group)
        ids = np.full((len(group), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        labels = np.full((len(group), width), -100, dtype=np.int64)
        for row, d in enumerate(group):
            n = len(d.ids)
            ids[row, :n], mask[row, :n] = d.ids, 1
            labels[row, 1:n] = np.where(d.target[1:], d.ids[1:], -100)  # HF shifts labels inside its loss
        mb = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
              "labels": torch.from_numpy(labels)}
        if pin:
            mb = {k: v.pin_memory() for k, v in mb.items()}
        mb["num_items_in_batch"] = n_targets
        mb["padded_tokens"] = ids.size
        out.append(mb)
    return out


# ----------------------------------------------------------------------------- models and steps

def llama_config(name: str, packed_length: int):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name], max_position_embeddings=max(packed_length, 2048), rms_norm_eps=1e-5,
                       tie_word_embeddings=False, use_cache=False, pad_token_id=PAD_ID, bos_token_id=1,
                       eos_token_id=2)


def new_llm(config, device: torch.device, seed: int, layers: int | None = None):
    """The same random initialisation for every path (same seed, built on the device)."""
    from transformers import LlamaForCausalLM

    if layers is not None:
        config = copy.deepcopy(config)
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    with torch.device(device):
        llm = LlamaForCausalLM(config)
    llm.config.use_cache = False
    return llm


@dataclass
class StepContext:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32: no autocast
    params: list
    optimizer: torch.optim.Optimizer
    max_norm: float = 1.0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def finish(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)  # returns a tensor: no host sync
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def packed_step(model, ctx: StepContext, batch: dict) -> torch.Tensor:
    """(a)/(b): one row, one forward/backward, one optimizer step; no host-device synchronisation."""
    inputs = model_inputs(batch, ctx.device)
    with ctx.autocast():
        loss = model(**inputs)
    loss.backward()
    ctx.finish()
    return loss.detach()


def padded_step(llm, ctx: StepContext, micro_batches: list[dict]) -> torch.Tensor:
    """(c): plain transformers, gradient accumulation over the padded micro-batches of one pack."""
    total = torch.zeros((), device=ctx.device)
    for mb in micro_batches:
        with ctx.autocast():
            out = llm(input_ids=mb["input_ids"].to(ctx.device, non_blocking=True),
                      attention_mask=mb["attention_mask"].to(ctx.device, non_blocking=True),
                      labels=mb["labels"].to(ctx.device, non_blocking=True),
                      num_items_in_batch=mb["num_items_in_batch"], use_cache=False)
        out.loss.backward()
        total += out.loss.detach()
        del out
    ctx.finish()
    return total


# ----------------------------------------------------------------------------- measurement

def count_host_syncs(fn) -> int:
    """Synchronising CUDA calls made by ``fn()`` (``torch.cuda.set_sync_debug_mode('warn')``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_steps(step, batches: list, device: torch.device, clock=time.perf_counter) -> list[float]:
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)]
        events[0].record()
        for i, b in enumerate(batches):
            step(b)
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events[:-1], events[1:])]
    times = []
    for b in batches:
        t = clock()
        step(b)
        times.append(clock() - t)
    return times


def run_path(name: str, args, device, batches, step_fn, make_model) -> dict:
    """Build the model, warm up, time the steps; everything inside one peak-memory window."""
    warm, timed = batches[:args.warmup], batches[args.warmup:]
    with PeakMemory(device) as pm:
        model = make_model()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer({"type": torch.optim.AdamW, "lr": 1e-4, "betas": (0.9, 0.95),
                                     "weight_decay": 0.01}, params, device)
        ctx = StepContext(device, args.dtype, params, optimizer)
        losses = []
        t0 = time.perf_counter()
        for b in warm:
            losses.append(step_fn(model, ctx, b))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup_s = time.perf_counter() - t0
        clock = time.process_time if args.cpu_clock == "process" else time.perf_counter
        times = time_steps(lambda b: losses.append(step_fn(model, ctx, b)), timed, device, clock)
    result = {"name": name, "times": times, "losses": [float(x) for x in losses], "peak": pm.peak_bytes,
              "memory_method": pm.method, "warmup_s": warmup_s, "syncs": None, "fused": optimizer.defaults.get("fused")}
    if device.type == "cuda" and args.check_sync:
        result["syncs"] = count_host_syncs(lambda: step_fn(model, ctx, timed[-1]))
        torch.cuda.synchronize(device)
    if args.profile and name.startswith("(a)"):
        profile(lambda: [step_fn(model, ctx, b) for b in timed[-2:]], device)
    del model, optimizer, ctx, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def prewarm(device, dtype, paths: list[tuple], seed: int) -> float:
    """One step of each path with a one-layer model, before anything is measured.

    Libraries initialise lazily (oneDNN/cuBLAS handles and workspaces, kernel
    caches, compiled graphs: the layer graph is the same in the full model);
    without this the first path measured would pay for all of that in its
    warm-up time and peak memory.
    """
    t0 = time.perf_counter()
    for make_model, step_fn, batch in paths:
        model = make_model(layers=1)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer({"type": torch.optim.AdamW, "lr": 1e-4}, params, device)
        step_fn(model, StepContext(device, dtype, params, optimizer), batch)
        del model, optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def profile(fn, device) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n# torch.profiler, 2 steps of (a), sorted by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


# ----------------------------------------------------------------------------- report

def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    n = torch.get_num_threads()
    return f"{model}, {n} intra-op thread{'s' if n > 1 else ''}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "evotune", "bench"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options, with the per-device defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default: tiny on CPU, llama-1b on CUDA")
    p.add_argument("--packed-length", type=int, default=None, help="default: 1024 on CPU, 16384 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2, 3 with --compile)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="bfloat16: autocast with fp32 master weights (default on CUDA); float32 (default on CPU)")
    p.add_argument("--ac", choices=AC_MODES, default=None,
                   help="activation checkpointing (default: selective on CUDA, none on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layers of (a) and (b)")
    p.add_argument("--paths", default="abc", help="which of a, b, c to run")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU)")
    p.add_argument("--cpu-clock", choices=("process", "wall"), default="process",
                   help="CPU step time: process CPU time (default) or wall clock")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by CUDA name)")
    p.add_argument("--no-check-sync", dest="check_sync", action="store_false")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of two steps of (a)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or ("llama-1b" if cuda else "tiny")
    args.packed_length = args.packed_length or (16384 if cuda else 1024)
    args.steps = args.steps or 10
    args.warmup = args.warmup if args.warmup is not None else (3 if args.compile else 2)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.ac = args.ac or ("selective" if cuda else "none")
    args.threads = args.threads or (None if cuda else 1)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Train the three paths, print the table; returns one result dict per path."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = llama_config(args.model, args.packed_length)
    n_steps = args.warmup + args.steps
    packs = make_packs(n_steps, args.packed_length, config.vocab_size, args.seed)
    doc_lengths = [[len(d.ids) for d in pack] for pack in packs]
    real_tokens = [sum(lengths) for lengths in doc_lengths]
    probe = new_llm(config, torch.device("meta"), args.seed)
    n_matmul = M.matmul_params(probe)
    n_layers, attn_dim = M.attention_dim(probe)
    del probe
    flops = [M.model_flops(n_matmul, n_layers, attn_dim, lengths) for lengths in doc_lengths]
    peak = args.peak_tflops or M.peak_tflops(device)

    print(f"# train throughput: {args.model} ({n_matmul / 1e6:.1f}M matmul params), packed length "
          f"{args.packed_length}, {args.warmup} warm-up + {args.steps} timed steps per path, "
          f"{'bf16 autocast (fp32 master weights)' if args.dtype == torch.bfloat16 else 'fp32'}, AC {args.ac}"
          f"{', compiled layers in (a)/(b)' if args.compile else ''}")
    all_lengths = np.concatenate([np.array(x) for x in doc_lengths])
    print(f"# data: {len(all_lengths)} documents, length median {np.median(all_lengths):.0f}, "
          f"mean {all_lengths.mean():.0f}, max {all_lengths.max()}")
    print(f"# machine: {machine(device)}; torch {torch.__version__}; commit {commit()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if not cuda:
        print(f"# step time: {'process CPU time' if args.cpu_clock == 'process' else 'wall clock'}")
    print(f"# command: python {shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}")

    batches = [packed_batch(pack, pin=cuda) for pack in packs]
    micro = [padded_micro_batches(pack, args.packed_length, pin=cuda) for pack in packs]

    def make_evotune(varlen: bool):
        def build(layers=None):
            model = SupervisedFinetune(new_llm(config, device, args.seed, layers), use_varlen_attn=varlen,
                                       activation_checkpointing=False)
            set_activation_checkpointing(model.llm, args.ac)
            if args.compile:
                compile_decoder_layers(model.llm)
            return model.train()
        return build

    def make_hf(layers=None):
        llm = new_llm(config, device, args.seed, layers)
        llm.set_attn_implementation("sdpa")
        set_activation_checkpointing(llm, args.ac)
        return llm.train()

    paths = [
        ("a", "(a) evotune packed + varlen", make_evotune(True), packed_step, batches,
         [args.packed_length] * n_steps),
        ("b", "(b) evotune packed, no varlen", make_evotune(False), packed_step, batches,
         [args.packed_length] * n_steps),
        ("c", "(c) transformers, padded rows", make_hf, padded_step, micro,
         [sum(mb["padded_tokens"] for mb in m) for m in micro]),
    ]
    paths = [p for p in paths if p[0] in args.paths]
    prewarm_s = prewarm(device, args.dtype, [(make, step, data[0]) for _, _, make, step, data, _ in paths], args.seed)
    results = []
    for _, name, make, step, data, padded in paths:
        results.append(run_path(name, args, device, data, step, make))
        results[-1]["padded"] = padded

    timed = slice(args.warmup, n_steps)
    print()
    print("| path | real tokens/s | padding | MFU | peak memory | host syncs/step | loss first / last |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rates = [t / s for t, s in zip(real_tokens[timed], r["times"])]
        r["tps"] = statistics.median(rates)
        mfu = "n/a" if not peak else f"{100 * statistics.median(f / s for f, s in zip(flops[timed], r['times'])) / (peak * 1e12):.1f}%"
        pad = 1 - sum(real_tokens[timed]) / sum(r["padded"][timed])
        mem = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.2f} GiB"
        syncs = "n/a" if r["syncs"] is None else str(r["syncs"])
        print(f"| {r['name']} | {r['tps']:,.0f} | {100 * pad:.1f}% | {mfu} | {mem} | {syncs} | "
              f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
    by = {r["name"][1]: r for r in results}
    ratios = []
    if "a" in by and "c" in by:
        ratios.append(f"a/c = {by['a']['tps'] / by['c']['tps']:.2f}x")
    if "a" in by and "b" in by:
        ratios.append(f"a/b = {by['a']['tps'] / by['b']['tps']:.2f}x")
    print()
    if ratios:
        print("ratios of median real tokens/s: " + ", ".join(ratios))
    print(f"peak memory: {results[0]['memory_method']}; fused AdamW: {results[0]['fused']}; "
          f"pre-warm (1-layer models) {prewarm_s:.1f} s; warm-up s: "
          + ", ".join(f"{r['name'][:3]} {r['warmup_s']:.1f}" for r in results))
    if peak is None:
        print("MFU: n/a (no known peak for this device; pass --peak-tflops)")
    else:
        print(f"MFU against {peak:g} TFLOP/s, model FLOPs on real document lengths")
    return results


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
