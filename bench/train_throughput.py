"""Training throughput: evotune (default config) vs the best Hugging Face recipe vs plain transformers.

    python bench/train_throughput.py        # CPU, tiny model, about a minute on 2 cores
    python bench/train_throughput.py --device cuda --model llama-1b --packed-length 16384 [--profile]
    python bench/train_throughput.py --device cuda --model 7b-proxy --packed-length 32768 --paths d
    bench/gpu_suite.sh                      # every path and shape, one table (docs/performance.md)

Four ways to train the same documents, one optimizer step per pack:

(a) evotune as ``evotune train`` runs it: the pack's documents in one row,
    ``SupervisedFinetune`` with varlen attention (``cu_seqlens``, max length and
    supervised-token indices prepared by ``packed_collate`` on the host), the
    chunked loss over the supervised tokens only, ``parallelize`` (fused
    kernels, activation checkpointing and compilation as the settings say,
    then FSDP2 with bf16 mixed precision on a one-process group) and the
    loop's own ``_train_step``. With ``--ac``, ``--compile`` and ``--kernels``
    all 'auto' (the defaults) the row is the **default** config.
(b) the same with ``use_varlen_attn=False``: plain causal attention over the
    whole row (documents see each other, positions 0..P-1).
(c) plain transformers: one document per row, padded to the longest of its
    micro-batch, SDPA attention with the padding mask, labels -100 on padding
    and prompt tokens, the model's own loss (full logits). The pack's documents
    are taken in order into micro-batches of at most ``packed_length`` padded
    tokens (the memory budget of one pack) and accumulated into one optimizer
    step with ``num_items_in_batch`` = the step's supervised tokens (as the HF
    Trainer does), so (c) optimises exactly (a)'s objective.
(d) the best Hugging Face recipe, as TRL recommends it (``padding_free=True``,
    ``use_liger_kernel=True``): the pack's documents concatenated in one row
    with ``position_ids`` restarting per document, no attention mask, the
    first flash attention transformers can use for that (flash_attention_4,
    _3, _2; where none is installed, evotune's registered varlen function, the
    same kernels, so that the rows stay correct), Liger's kernels incl. its
    fused linear cross-entropy applied the way TRL does when liger-kernel is
    installed (it patches transformers' Llama module, so with Liger (d) runs
    alone: ``--paths d``), autocast bf16 over fp32 weights as the HF Trainer's
    ``bf16=True``.

(a), (c) and (d) train the same objective: their losses are compared step by
step (``loss check``: largest relative difference, within 2e-5 in fp32 and
3e-2 in bf16, where (a)'s bf16 weights and (c)/(d)'s fp32 weights under
autocast round differently). Same model (same seed and initialisation), same
optimizer (AdamW, fused kernel where one exists), gradient clipping at 1.0.
(c) and (d) use transformers' checkpointing switch (``--hf-ac``; by default
off when (a)'s 'auto' chose no checkpointing, else full).

Shapes: ``tiny`` (CPU), ``llama-1b`` (TinyLlama's widths) and ``7b-proxy``
(InternLM2-7B's widths: hidden 4096, 32 heads / 8 kv heads, FFN 14336, vocab
92,544; ``--layers``, by default as many as fit the GPU, see ``fit_layers``).
Data: log-normal document lengths (median ``--doc-median``, 600 tokens by
default, a realistic SFT median, and 600 x packed_length / 16384 below 4096
tokens so that the small CPU runs keep the same shape; sigma 1, at most
``packed_length``), the first 30% of each document prompt (no loss), cut at
pack boundaries as InternEvo packs them; the pieces are the documents of all
paths: identical real tokens and identical model FLOPs.

Measured: warm-up steps excluded; per-step time from CUDA events recorded
between steps (no synchronisation between steps), or on CPU the process's CPU
time with one intra-op thread (``--threads 1``: on a shared, oversubscribed
machine OpenMP threads spin against each other and wall time is mostly other
people's load; ``--cpu-clock wall`` for the wall clock);
real tokens/s = the step's real tokens / its time, median over steps; MFU =
model FLOPs on the real document lengths (``evotune.train.metrics.model_flops``)
/ step time / peak; peak memory over model build and all steps (see
``bench/peak_memory.py``); host synchronisations of one step
(:func:`count_host_syncs`). Batches are collated and pinned before timing
(what a prefetching loader gives) and copied with ``non_blocking=True``
inside the step. ``--json PATH`` writes every number. Not a test: run it by
hand and record the output in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import PeakMemory  # noqa: E402

from evotune.data.collate import packed_collate  # noqa: E402
from evotune.model import attention, kernels  # noqa: E402
from evotune.model.checkpointing import AC_MODES, AUTO, set_activation_checkpointing  # noqa: E402
from evotune.model.finetune import SupervisedFinetune  # noqa: E402
from evotune.parallel import fsdp  # noqa: E402
from evotune.parallel.env import DistEnv  # noqa: E402
from evotune.parallel.mesh import build_mesh  # noqa: E402
from evotune.train import metrics as M  # noqa: E402
from evotune.train.loop import _train_step  # noqa: E402
from evotune.train.optim import build_optimizer  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096),
    # TinyLlama-1.1B's shape, random initialisation
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     intermediate_size=5632, vocab_size=32000),
    # InternLM2-7B's widths; the number of layers is --layers or fit_layers()
    "7b-proxy": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=92544),
}
SAME_LOSS_RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
PAD_ID = 0


# ----------------------------------------------------------------------------- data

@dataclass
class Doc:
    ids: np.ndarray  # token ids
    target: np.ndarray  # bool: token i is predicted (from token i-1) and trained on


def default_doc_median(packed_length: int) -> float:
    """600 tokens (a realistic SFT median); scaled down with the pack below 4096 tokens (CPU runs)."""
    return 600.0 if packed_length >= 4096 else 600.0 * packed_length / 16384


def make_packs(n_packs: int, packed_length: int, vocab: int, seed: int, median: float | None = None,
               sigma: float = 1.0, prompt_fraction: float = 0.3) -> list[list[Doc]]:
    """Documents of log-normal length, cut at pack boundaries into ``n_packs`` full packs."""
    rng = np.random.default_rng(seed)
    median = median or default_doc_median(packed_length)
    packs, current, room = [], [], packed_length
    while len(packs) < n_packs:
        n = int(np.clip(round(rng.lognormal(np.log(median), sigma)), 2, packed_length))
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


def padding_free_batch(docs: list[Doc], pin: bool) -> dict:
    """(d): TRL's padding-free row: documents concatenated, ``position_ids`` restarting per document,
    labels = the tokens trained on (-100 on prompts and on each piece's first token, also where a
    document continues from the previous pack, so transformers' shift never predicts across documents), ``num_items_in_batch`` = supervised tokens."""
    ids = np.concatenate([d.ids for d in docs])
    labels = np.concatenate([np.where(d.target & (np.arange(len(d.ids)) > 0), d.ids, -100) for d in docs])
    batch = {"input_ids": torch.from_numpy(ids).unsqueeze(0),
             "position_ids": torch.from_numpy(np.concatenate([np.arange(len(d.ids)) for d in docs])).unsqueeze(0),
             "labels": torch.from_numpy(labels).unsqueeze(0)}
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    batch["num_items_in_batch"] = int((labels != -100).sum())
    return batch


# ----------------------------------------------------------------------------- models and steps

def llama_config(name: str, packed_length: int, layers: int | None = None):
    from transformers import LlamaConfig

    shape = dict(MODELS[name])
    if layers:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(**shape, max_position_embeddings=max(packed_length, 2048), rms_norm_eps=1e-5,
                       tie_word_embeddings=False, use_cache=False, pad_token_id=PAD_ID, bos_token_id=1,
                       eos_token_id=2)


def fit_layers(name: str, free_bytes: int, fraction: float = 0.55) -> int:
    """Decoder layers whose weights, gradients, AdamW state and bf16 copy (18 bytes per parameter)
    together with the embedding and head fit in ``fraction`` of ``free_bytes``; the rest is left for
    activations (about 25 GB for 8 layers x 32k tokens of the 7B widths with selective checkpointing)."""
    cfg = MODELS[name]
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * cfg["intermediate_size"]
    outer = 2 * cfg["vocab_size"] * h
    return max(1, int((fraction * free_bytes - 18 * outer) // (18 * per_layer)))


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
    dtype: torch.dtype  # (c)/(d): autocast dtype (float32: none); (a)/(b): FSDP's compute dtype
    params: list
    optimizer: torch.optim.Optimizer
    max_norm: float = 1.0
    pmesh: object = None  # (a)/(b): the one-process mesh

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def finish(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)  # returns a tensor: no host sync
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def packed_step(model, ctx: StepContext, batch: dict) -> torch.Tensor:
    """(a)/(b): the training loop's own step (``_train_step``: one micro-batch, loss 'pack'), then
    the loop's gradient clipping over the sharded gradients and the optimizer step."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=ctx.device)
    loss = _train_step(model, [batch], env, ctx.pmesh, fsdp.REPLICATE, 1, "pack")[0]
    fsdp.clip_grad_norm_(model.parameters(), ctx.max_norm)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return loss


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


def padding_free_step(llm, ctx: StepContext, batch: dict) -> torch.Tensor:
    """(d): one padding-free row through transformers (its loss; Liger's fused linear CE when applied)."""
    with ctx.autocast():
        out = llm(**{k: batch[k].to(ctx.device, non_blocking=True) for k in ("input_ids", "position_ids", "labels")},
                  num_items_in_batch=batch["num_items_in_batch"], use_cache=False)
    out.loss.backward()
    loss = out.loss.detach()
    del out
    ctx.finish()
    return loss


HF_FLASH = ("flash_attention_4", "flash_attention_3", "flash_attention_2")


def hf_padding_free_attention(llm) -> str:
    """The first flash attention transformers accepts here (padding-free rows need one), else
    evotune's registered varlen function (the same position-reset semantics and kernels)."""
    for name in HF_FLASH:
        try:
            llm.set_attn_implementation(name)
            return name
        except (ImportError, ValueError):
            continue
    name = attention.register()
    llm.set_attn_implementation(name)
    return name


def apply_hf_liger(llm) -> bool:
    """Liger-Kernel the way TRL's ``use_liger_kernel=True`` applies it (RoPE, RMSNorm, SwiGLU, fused
    linear cross-entropy); False where liger-kernel or CUDA is missing."""
    if not kernels.liger_available(next(llm.parameters()).device):
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=llm)
    return True


# ----------------------------------------------------------------------------- measurement

_HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def count_host_syncs(fn, device: torch.device) -> int:
    """Host synchronisations made by ``fn()``.

    CUDA: the synchronising calls ``torch.cuda.set_sync_debug_mode('warn')``
    reports (``.item()``, ``.tolist()``, blocking copies, ``nonzero``, ...).
    CPU (no device to wait for): the reads of a tensor's value on the host
    (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, counted by
    patching ``torch.Tensor``), each of which would be a synchronisation on a
    GPU.
    """
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(original):
        def read(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


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


def run_path(path, args, device, batches) -> dict:
    """Build the model, warm up, time the steps; everything inside one peak-memory window."""
    warm, timed = batches[:args.warmup], batches[args.warmup:]
    step_fn = path.step
    with PeakMemory(device) as pm:
        model, ctx = path.build(), None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer({"type": torch.optim.AdamW, "lr": 1e-4, "betas": (0.9, 0.95),
                                     "weight_decay": 0.01}, params, device)
        ctx = StepContext(device, args.dtype, params, optimizer, pmesh=path.pmesh)
        losses = []
        t0 = time.perf_counter()
        for b in warm:
            losses.append(step_fn(model, ctx, b))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup_s = time.perf_counter() - t0
        clock = time.process_time if args.cpu_clock == "process" else time.perf_counter
        times = time_steps(lambda b: losses.append(step_fn(model, ctx, b)), timed, device, clock)
    result = {"name": path.name, "key": path.key, "times": times, "losses": [float(x) for x in losses],
              "peak": pm.peak_bytes, "memory_method": pm.method, "warmup_s": warmup_s, "syncs": None,
              "fused": optimizer.defaults.get("fused"), "notes": list(path.notes)}
    if args.check_sync:
        result["syncs"] = count_host_syncs(lambda: step_fn(model, ctx, timed[-1]), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if args.profile and path.key == "a":
        profile(lambda: [step_fn(model, ctx, b) for b in timed[-2:]], device)
    del model, optimizer, ctx, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def prewarm(device, dtype, paths: list, batches: dict, seed: int) -> float:
    """One step of each path with a one-layer model, before anything is measured.

    Libraries initialise lazily (oneDNN/cuBLAS handles and workspaces, kernel
    caches, compiled graphs: the layer graph is the same in the full model);
    without this the first path measured would pay for all of that in its
    warm-up time and peak memory.
    """
    t0 = time.perf_counter()
    for path in paths:
        model = path.build(layers=1, log=None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer({"type": torch.optim.AdamW, "lr": 1e-4}, params, device)
        path.step(model, StepContext(device, dtype, params, optimizer, pmesh=path.pmesh), batches[path.key][0])
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



# ----------------------------------------------------------------------------- paths


@dataclass
class BenchPath:
    key: str  # a, b, c, d
    name: str
    build: object  # build(layers=None, log=print) -> model
    step: object
    pmesh: object = None
    notes: list = field(default_factory=list)  # what the path chose ('auto' decisions, attention, Liger)


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A process group of one (nccl on CUDA, gloo on the CPU), as ``evotune train`` has on one GPU, so
    that (a)/(b) run under FSDP2 and its mixed precision; removed again afterwards."""
    created = not dist.is_initialized()
    if created:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        yield build_mesh(DistEnv(rank=0, world_size=1, local_rank=0, device=device))
    finally:
        if created:
            dist.destroy_process_group()


def evotune_path(key: str, args, config, device, pmesh) -> BenchPath:
    varlen = key == "a"
    default = args.ac == AUTO and args.compile == AUTO and args.kernels == AUTO and args.attn_kernel is None
    if varlen:
        name = "(a) evotune default" if default else (
            f"(a) evotune packed + varlen (ac {args.ac}, compile {args.compile}, kernels {args.kernels}"
            f"{', attention ' + args.attn_kernel if args.attn_kernel else ''})")
    else:
        name = "(b) evotune packed, no varlen"
    path = BenchPath(key, name, None, packed_step, pmesh)

    def build(layers=None, log=print):
        compile_setting = {"backend": args.compile_backend} if args.compile == "on" and args.compile_backend \
            else {"auto": AUTO, "on": True, "off": False}[args.compile]
        model = SupervisedFinetune(new_llm(config, device, args.seed, layers), use_varlen_attn=varlen,
                                   activation_checkpointing=args.ac, torch_compile=compile_setting,
                                   fused_kernels=args.kernels)

        def note(line):
            path.notes.append(line.removeprefix("evotune: "))
            print(f"# {key}: {line.removeprefix('evotune: ')}")

        fsdp.parallelize(model, pmesh, fsdp.REPLICATE, device, args.dtype, tokens=args.packed_length,
                         log=note if log else None)
        if log and varlen and device.type == "cuda":
            note(f"varlen attention kernel: {attention.varlen_kernel(device)}")
        return model.train()

    path.build = build
    return path


def hf_path(key: str, args, config, device, hf_ac) -> BenchPath:
    if key == "c":
        path = BenchPath("c", "(c) transformers, padded rows", None, padded_step)
    else:
        path = BenchPath("d", "(d) HF best recipe: padding-free", None, padding_free_step)

    def build(layers=None, log=print):
        llm = new_llm(config, device, args.seed, layers)
        mode = hf_ac()
        if key == "c":
            llm.set_attn_implementation("sdpa")
            chosen = ["attention sdpa"]
        else:
            attn, liger = hf_padding_free_attention(llm), apply_hf_liger(llm)
            path.name = f"(d) HF best recipe: padding-free, {attn}{', Liger' if liger else ''}"
            chosen = [f"attention {attn}", "Liger (RoPE, RMSNorm, SwiGLU, fused linear CE)" if liger else
                      "no Liger (liger-kernel not installed or no CUDA)"]
        set_activation_checkpointing(llm, mode)
        if log:
            path.notes[:] = chosen + [f"checkpointing {mode}"]
            print(f"# {key}: " + ", ".join(path.notes))
        return llm.train()

    path.build = build
    return path


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options, with the per-device defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default: tiny on CPU, llama-1b on CUDA")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the model's; 7b-proxy on CUDA: as many as fit, fit_layers)")
    p.add_argument("--packed-length", type=int, default=None, help="default: 1024 on CPU, 16384 on CUDA")
    p.add_argument("--doc-median", type=float, default=None,
                   help="median document length (default 600; scaled with the pack below 4096 tokens)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2, 3 when compiling)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype: bfloat16 (default on CUDA: FSDP2 mixed precision for (a)/(b), autocast "
                        "for (c)/(d), fp32 master weights everywhere); float32 (default on CPU)")
    p.add_argument("--ac", choices=AC_MODES + (AUTO,), default=AUTO, help="(a)/(b) activation checkpointing")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="(a)/(b) torch.compile of the decoder layers ('auto': on CUDA with bf16)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend for --compile on (e.g. aot_eager)")
    p.add_argument("--kernels", choices=kernels.FUSED_KERNELS, default=AUTO, help="(a)/(b) fused kernels")
    p.add_argument("--attn-kernel", choices=attention.VARLEN_KERNELS, default=None,
                   help="(a) CUDA varlen kernel (default: the first available)")
    p.add_argument("--hf-ac", choices=("full", "none"), default=None,
                   help="(c)/(d) checkpointing (default: none when (a)'s 'auto' chose none, else full)")
    p.add_argument("--paths", default="abcd", help="which of a, b, c, d to run")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU)")
    p.add_argument("--cpu-clock", choices=("process", "wall"), default="process",
                   help="CPU step time: process CPU time (default) or wall clock")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by CUDA name)")
    p.add_argument("--no-check-sync", dest="check_sync", action="store_false")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of two steps of (a)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or ("llama-1b" if cuda else "tiny")
    args.packed_length = args.packed_length or (16384 if cuda else 1024)
    args.steps = args.steps or 10
    compiles = args.compile == "on" or (args.compile == "auto" and cuda and args.dtype != "float32")
    args.warmup = args.warmup if args.warmup is not None else (3 if compiles else 2)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.threads = args.threads or (None if cuda else 1)
    if args.model == "7b-proxy" and args.layers is None:
        args.layers = fit_layers(args.model, torch.cuda.mem_get_info(device)[0]) if cuda else 2
    return args


def loss_check(results: list[dict], dtype: torch.dtype) -> str:
    """(a), (c), (d) train the same objective: their step losses agree (largest relative difference)."""
    by = {r["key"]: r for r in results if not r.get("error")}
    same = [k for k in "acd" if k in by]
    if len(same) < 2:
        return "n/a (fewer than two of a, c, d)"
    ref = np.array(by[same[0]]["losses"])
    worst = max(float(np.max(np.abs(np.array(by[k]["losses"]) - ref) / np.abs(ref))) for k in same[1:])
    ok = worst <= SAME_LOSS_RTOL[dtype]
    for k in same:
        by[k]["loss_check"] = "ok" if ok else "DIFFERENT"
    return (f"{'ok' if ok else 'DIFFERENT'}: {'/'.join(same)} losses agree to {worst:.1e} relative at every step "
            f"(tolerance {SAME_LOSS_RTOL[dtype]:g})")


def run(args: argparse.Namespace) -> list[dict]:
    """Train the paths, print the table; returns one result dict per path."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "d" in args.paths and len(args.paths) > 1 and kernels.liger_available(device):
        raise SystemExit("with liger-kernel installed (d) patches transformers' Llama module as TRL does: "
                         "run it on its own (--paths d), as bench/gpu_suite.sh does")
    attention.use_varlen_kernel(args.attn_kernel)

    config = llama_config(args.model, args.packed_length, args.layers)
    n_steps = args.warmup + args.steps
    packs = make_packs(n_steps, args.packed_length, config.vocab_size, args.seed, args.doc_median)
    doc_lengths = [[len(d.ids) for d in pack] for pack in packs]
    real_tokens = [sum(lengths) for lengths in doc_lengths]
    probe = new_llm(config, torch.device("meta"), args.seed)
    n_matmul = M.matmul_params(probe)
    n_layers, attn_dim = M.attention_dim(probe)
    del probe
    flops = [M.model_flops(n_matmul, n_layers, attn_dim, lengths) for lengths in doc_lengths]
    peak = args.peak_tflops or M.peak_tflops(device)
    shape = f"{args.model} x{config.num_hidden_layers} @ {args.packed_length // 1024}k" \
        if args.packed_length >= 1024 else f"{args.model} x{config.num_hidden_layers} @ {args.packed_length}"

    print(f"# train throughput: {shape} ({n_matmul / 1e6:.1f}M matmul params), {args.warmup} warm-up + "
          f"{args.steps} timed steps per path, "
          f"{'bf16 compute, fp32 master weights' if args.dtype == torch.bfloat16 else 'fp32'}; (a)/(b): ac "
          f"{args.ac}, compile {args.compile}, kernels {args.kernels}")
    all_lengths = np.concatenate([np.array(x) for x in doc_lengths])
    print(f"# data: {len(all_lengths)} documents, length median {np.median(all_lengths):.0f}, "
          f"mean {all_lengths.mean():.0f}, max {all_lengths.max()}")
    print(f"# machine: {machine(device)}; torch {torch.__version__}; commit {commit()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if not cuda:
        print(f"# step time: {'process CPU time' if args.cpu_clock == 'process' else 'wall clock'}")
    command = f"python {shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}"
    print(f"# command: {command}")

    packed = [packed_batch(pack, pin=cuda) for pack in packs]
    batches = {"a": packed, "b": packed,
               "c": [padded_micro_batches(pack, args.packed_length, pin=cuda) for pack in packs],
               "d": [padding_free_batch(pack, pin=cuda) for pack in packs]}
    padded = {"a": [args.packed_length] * n_steps, "b": [args.packed_length] * n_steps,
              "c": [sum(mb["padded_tokens"] for mb in m) for m in batches["c"]], "d": real_tokens}

    results = []
    with one_process_group(device) as pmesh:
        chosen = {}

        def hf_ac():
            if args.hf_ac:
                return args.hf_ac
            return "none" if chosen.get("a") == "none" else "full"

        paths = {"a": lambda: evotune_path("a", args, config, device, pmesh),
                 "b": lambda: evotune_path("b", args, config, device, pmesh),
                 "c": lambda: hf_path("c", args, config, device, hf_ac),
                 "d": lambda: hf_path("d", args, config, device, hf_ac)}
        paths = [paths[k]() for k in "abcd" if k in args.paths]
        prewarm_s = prewarm(device, args.dtype, paths, batches, args.seed)
        for path in paths:
            path.notes.clear()
            try:
                results.append(run_path(path, args, device, batches[path.key]))
            except torch.OutOfMemoryError:  # a row saying so; the other paths still run
                gc.collect()
                torch.cuda.empty_cache()
                print(f"# {path.key}: out of memory")
                results.append({"name": path.name, "key": path.key, "error": "out of memory", "losses": [],
                                "notes": list(path.notes), "peak": None, "syncs": None, "times": [],
                                "warmup_s": 0.0, "memory_method": "", "fused": None})
            results[-1]["padded"] = padded[path.key]
            ac_note = next((n for n in path.notes if n.startswith("activation_checkpointing='auto' -> '")), None)
            if ac_note:
                chosen[path.key] = ac_note.split("'")[3]

    timed = slice(args.warmup, n_steps)
    check = loss_check(results, args.dtype)
    print()
    print("| path | shape | real tokens/s | padding | MFU | peak memory | host syncs/step | loss first / last | "
          "loss check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        r["shape"] = shape
        if r.get("error"):
            r["tps"] = r["mfu"] = None
            print(f"| {r['name']} | {shape} | {r['error']} | | | | | | |")
            continue
        rates = [t / s for t, s in zip(real_tokens[timed], r["times"])]
        r["tps"] = statistics.median(rates)
        r["mfu"] = None if not peak else statistics.median(f / s for f, s in zip(flops[timed], r["times"])) / (
            peak * 1e12)
        r["padding"] = 1 - sum(real_tokens[timed]) / sum(r["padded"][timed])
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.2f} GiB"
        syncs = "n/a" if r["syncs"] is None else str(r["syncs"])
        print(f"| {r['name']} | {shape} | {r['tps']:,.0f} | {100 * r['padding']:.1f}% | {mfu} | {mem} | {syncs} | "
              f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f} | {r.get('loss_check', 'n/a')} |")
    by = {r["key"]: r for r in results if not r.get("error")}
    ratios = {f"{x}/{y}": by[x]["tps"] / by[y]["tps"] for x, y in (("a", "d"), ("a", "c"), ("a", "b"))
              if x in by and y in by}
    print()
    if ratios:
        print("ratios of median real tokens/s: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    print(f"loss check: {check}")
    print(f"peak memory: {results[0]['memory_method']}; fused AdamW: {results[0]['fused']}; "
          f"pre-warm (1-layer models) {prewarm_s:.1f} s; warm-up s: "
          + ", ".join(f"{r['key']} {r['warmup_s']:.1f}" for r in results))
    print("host syncs/step: " + ("CUDA sync debug mode" if cuda else "host reads of tensor values (item, tolist, "
                                 "float, int, bool), each a synchronisation on a GPU"))
    if peak is None:
        print("MFU: n/a (no known peak for this device; pass --peak-tflops)")
    else:
        print(f"MFU against {peak:g} TFLOP/s, model FLOPs on real document lengths")
    if args.json:
        out = {"machine": machine(device), "torch": torch.__version__, "commit": commit(), "command": command,
               "shape": shape, "dtype": str(args.dtype).removeprefix("torch."), "loss_check": check, "ratios": ratios, "peak_tflops": peak,
               "rows": [{k: r.get(k) for k in ("key", "name", "shape", "tps", "mfu", "padding", "peak", "syncs",
                                               "losses", "loss_check", "notes", "warmup_s", "times", "error")}
                        for r in results]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return results


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
