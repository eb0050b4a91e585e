"""Peak memory and step time of one LoRA / QLoRA training step at InternLM2-7B widths, vs a full fine-tune.

    python bench/lora_memory.py                               # CPU: 1, 2, 4 layers measured, 32 extrapolated
    python bench/lora_memory.py --device cuda --layers 32     # GPU: the whole 7B measured (untested)
    python bench/lora_memory.py --shape tiny --tokens 256 --steps 1   # a minute: checks the script

The question (issue 15): does QLoRA train a 7B InternLM2 on 2k tokens in
XTuner's headline 8 GB, and what does LoRA in bf16 need, against a full
fine-tune? Shape: InternLM2-7B (hidden 4096, 32 layers, 32 heads / 8 kv heads,
FFN 14336, vocabulary 92,544), one packed row of ``--tokens`` (2048) tokens,
batch 1, random weights (normal, std 0.02; nothing is downloaded).

Modes, each built the way ``evotune train`` builds it:

* ``lora``: the base frozen in bf16, peft LoRA r=64 alpha=16 dropout 0.1 on
  every linear layer of the decoder (XTuner's QLoRA config numbers; evotune
  loads InternLM2 as a Llama and adapts its ``wqkv`` as XTuner does: q/k/v_proj
  share one A, one rank-64 adapter on wqkv, 151.0 M trainable parameters).
* ``qlora``: the same on the decoder's linear layers quantised by
  bitsandbytes, NF4, double quantisation, compute dtype bf16 (XTuner's
  ``BitsAndBytesConfig``); embedding, norms and head stay bf16.
* ``qlora8``: ``qlora`` with bitsandbytes' ``AdamW8bit`` (the same lr, betas and
  weight decay) instead of torch's AdamW: the two moments in 8 bits (1 byte
  each per trained parameter instead of 4), what a QLoRA user picks to save
  memory; evotune steps it on FSDP2's parameters (``evotune.train.optim``).
  Not in the default ``--modes``: XTuner's QLoRA configs use torch's AdamW.
* ``full``: a full fine-tune, **computed**, not run: evotune's own estimate of
  weights, gradients and AdamW state (``evotune.parallel.fsdp.state_bytes``: 16
  bytes per trained parameter + its 2-byte bf16 compute copy) plus the
  activations full checkpointing keeps (``measure_activation_bytes``: the
  layer input per token and layer) and one layer's activations during its
  recomputation (the same function's ``'none'`` figure). Its
  transients (loss chunks, library workspaces) are not in it, so it is a
  lower bound.

The model path is evotune's: an InternLM2-named weight plan in bf16 goes through
the InternLM2 -> Llama mapping and ``build_llama`` (what ``load_model`` does for
an InternLM2 folder, minus the disk), then ``quantize`` for QLoRA (what
``load_model(quantization_config=...)`` calls), ``SupervisedFinetune(lora=...)``
with varlen attention, the chunked loss over the supervised tokens,
``activation_checkpointing='full'`` (what 'auto' picks on the CPU and for 2k
tokens on an 8 GB card; ``--ac``), ``torch_compile='auto'`` (off on the CPU and
for 4-bit layers) and ``fused_kernels='auto'``, ``parallelize`` under a
one-process group with ``evotune train``'s strategy for it (``strategy_for``:
FSDP2, bf16 mixed precision, frozen base stored in bf16 and left out of FSDP2,
adapter fp32 master weights whose bf16 copy each decoder layer frees after its
forward, 4-bit weights left alone, as on one GPU), AdamW
(lr 2e-4, betas 0.9/0.999, no weight decay: XTuner's) built by evotune's
``build_optimizer`` over the adapter only, and the loop's own ``_train_step``,
gradient clipping at 1 and the optimizer step (``train_throughput.packed_step``).
On the CPU the compute dtype is bf16 too (``evotune train`` computes in fp32
there; bf16 is what a GPU run stores and computes, and it runs on the CPU).

Measured, each mode and depth in its own process: after imports and one
warm-up step of a tiny model of the same mode (loads bitsandbytes' and oneDNN's
code, so that later steps do not count it), the bytes held once the model is
built, and the peak during ``--warmup`` + ``--steps`` training steps above the
state before building (``bench/peak_memory.py``: on the CPU the process's peak
RSS with freed tensors returned to the OS, on CUDA ``max_memory_allocated``).
The peak therefore holds weights, the adapter's gradients and AdamW state
(allocated by the first step, present in every later one), the activations and
the step's transients. Step time: wall clock, median of the ``--steps`` steps
after the warm-up.

On the CPU a 32-layer 7B does not run on a 2-core, 24 GiB machine in
reasonable time, so ``--layers 1,2,4`` are measured and 32 are
**extrapolated**: the least-squares line through the measured depths (per
layer + a fixed part: embedding, head, loss, libraries), with its largest
residual printed; the same for the step time and the state estimate. This
assumes the peak is reached at the same point of the step at every depth;
the residual over three depths checks it (two depths alone once put QLoRA's
slope 20% low). On a CPU without AVX512-BF16/AMX, bf16 backward products run
at ~0.3 GFLOP/s and even one layer does not finish: ``--cpu-matmul fp32``
computes them in fp32 blocks (``bench/cpu_matmul.py``: the same tensors kept,
at most 48 MiB more transients per product). ``--layers 32`` on a GPU
measures the whole model instead. Not a test: run by hand and record the
output in docs/performance.md (section "LoRA and QLoRA memory").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_memory import internlm2_shapes  # noqa: E402
from cpu_matmul import Fp32Matmul  # noqa: E402
from evotune.model.loss import DEFAULT_CHUNK_TOKENS  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402

GIB = 2**30
SHAPES = {  # InternLM2 config.json fields
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=92544),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512),
}
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")  # XTuner's QLoRA configs
QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype=torch.bfloat16)
OPTIMIZER = dict(lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
MODE_NAMES = {"full": "full fine-tune", "lora": "LoRA bf16", "qlora": "QLoRA NF4",
              "qlora8": "QLoRA NF4 + AdamW8bit"}


# ----------------------------------------------------------------------------- model and step


def internlm2_config(shape: str, layers: int, tokens: int) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
            "num_hidden_layers": layers, "hidden_act": "silu", "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000, "max_position_embeddings": max(tokens, 2048),
            "torch_dtype": "bfloat16", **SHAPES[shape]}


def internlm2_plan(cfg: dict, seed: int) -> dict:
    """Random weights in InternLM2's names and layout, each made when it is loaded (bf16, std 0.02)."""
    from evotune.checkpoint.plan import Planned

    shapes = internlm2_shapes(cfg, cfg["num_hidden_layers"])
    gen = torch.Generator().manual_seed(seed)

    def make(shape):
        if len(shape) == 1:
            return lambda: torch.ones(shape, dtype=torch.bfloat16)
        return lambda: torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    return {k: Planned(s, torch.bfloat16, make(s)) for k, s in shapes.items()}


def build_llm(shape: str, layers: int, tokens: int, mode: str, device: torch.device, seed: int = 0):
    """A random InternLM2 through evotune's InternLM2 loading path (a Llama), 4-bit for 'qlora*'."""
    from evotune.checkpoint.internlm2 import llama_config_from_internlm2, plan_internlm2_to_llama
    from evotune.checkpoint.source import ModelSource
    from evotune.model.internlm2 import build_llama
    from evotune.model.lora import quantize

    cfg = internlm2_config(shape, layers, tokens)
    config = llama_config_from_internlm2(cfg, where="bench InternLM2 config")
    plan = plan_internlm2_to_llama(internlm2_plan(cfg, seed), config.num_attention_heads,
                                   config.num_key_value_heads)
    llm = build_llama(config, plan, torch.bfloat16, where="bench InternLM2 weights")
    ModelSource("internlm2", None, cfg).attach(llm)  # as load_model records it: LoRA adapts wqkv as XTuner
    if device.type == "cuda":  # quantised where it will run, as bitsandbytes does on .to(device)
        llm = llm.to(device)
    if mode.startswith("qlora"):
        quantize(llm, QLORA)
    return llm.eval()


def _packed_row(tokens: int, vocab: int, seed: int, pin: bool) -> dict:
    from train_throughput import make_packs, packed_batch

    return packed_batch(make_packs(1, tokens, vocab, seed)[0], pin=pin)


def optimizer_class(eight_bit: bool) -> type:
    """bitsandbytes' ``AdamW8bit`` or torch's ``AdamW`` (XTuner's), both with ``OPTIMIZER``'s settings."""
    if eight_bit:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    return torch.optim.AdamW


def measure(mode: str, layers: int, args) -> dict:
    """One process's measurement of ``mode`` at ``layers`` decoder layers (see the module docstring)."""
    from train_throughput import StepContext, one_process_group, packed_step

    from evotune.model.finetune import SupervisedFinetune
    from evotune.parallel import fsdp
    from evotune.parallel.mesh import ParallelMesh
    from evotune.train.optim import build_optimizer, moment_bytes

    device = torch.device(args.device)
    dtype = torch.bfloat16
    notes: list[str] = []
    spec = {"type": optimizer_class(mode == "qlora8"), **OPTIMIZER}
    moments = moment_bytes(spec)  # what evotune train passes for this optimizer

    def build(shape, n_layers, tokens, pmesh, log):
        llm = build_llm(shape, n_layers, tokens, mode, device, args.seed)
        model = SupervisedFinetune(llm, activation_checkpointing=args.ac, torch_compile="auto",
                                   fused_kernels="auto", lora=LORA, loss_chunk_tokens=args.loss_chunk_tokens)
        fsdp.parallelize(model, pmesh, strategy, device, dtype, tokens=tokens, log=log, moment_bytes=moments)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(spec, params, device)
        return model.train(), StepContext(device, dtype, params, optimizer, pmesh=pmesh)

    def note(line):
        notes.append(line.removeprefix("evotune: "))

    group = one_process_group(device) if args.fsdp == "on" else contextlib.nullcontext(
        ParallelMesh(None, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0))
    routing = Fp32Matmul() if args.cpu_matmul == "fp32" else contextlib.nullcontext()
    with group as pmesh, routing:
        strategy = fsdp.strategy_for(None, pmesh, frozen_base=True)  # evotune train's, without --deepspeed
        # libraries initialise lazily: one step of a tiny model of the same mode before anything is measured
        with contextlib.redirect_stdout(sys.stderr):
            tiny, ctx = build("tiny", 1, 64, pmesh, None)
        packed_step(tiny, ctx, _packed_row(64, SHAPES["tiny"]["vocab_size"], args.seed, pin=False))
        del tiny, ctx
        rows = [_packed_row(args.tokens, SHAPES[args.shape]["vocab_size"], args.seed + i, pin=device.type == "cuda")
                for i in range(args.warmup + args.steps)]
        with PeakMemory(device) as since_start:  # only its held_bytes(): the model's bytes
            with contextlib.redirect_stdout(sys.stderr):  # the LoRA and parameter lines
                model, ctx = build(args.shape, layers, args.tokens, pmesh, note)
            held = since_start.held_bytes()
            trainable = sum(p.numel() for p in ctx.params)
            param_bytes = sum(p.nbytes for p in model.parameters())
            state = fsdp.state_bytes(model, pmesh, strategy, dtype, moments)
            times, losses = [], []
            with PeakMemory(device) as pm:  # the steps: peak above what the built model holds
                for row in rows:
                    t = time.perf_counter()
                    losses.append(float(packed_step(model, ctx, row)))
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t)
    return {"mode": mode, "layers": layers, "tokens": args.tokens, "held_bytes": held,
            "peak_bytes": None if pm.peak_bytes is None else held + pm.peak_bytes,
            "param_bytes": param_bytes, "trainable": trainable, "state_bytes": state,
            "optimizer": type(ctx.optimizer).__name__,
            "step_s": statistics.median(times[args.warmup:]) if len(times) > args.warmup else None,
            "times": times, "losses": losses, "method": pm.method, "notes": notes,
            "routed_products": routing.routed if args.cpu_matmul == "fp32" else None}


def full_finetune(args) -> dict:
    """The computed full fine-tune at ``--target-layers``: evotune's state and activation estimators."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evotune.checkpoint.internlm2 import llama_config_from_internlm2
    from evotune.model.checkpointing import measure_activation_bytes
    from evotune.parallel import fsdp
    from evotune.parallel.mesh import ParallelMesh

    config = llama_config_from_internlm2(internlm2_config(args.shape, args.target_layers, args.tokens))
    with torch.device("meta"):  # counted, never allocated
        meta = LlamaForCausalLM(config)
    one = ParallelMesh(None, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0)
    state = fsdp.state_bytes(meta, one, fsdp.REPLICATE, torch.bfloat16)
    small = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 8})  # one real layer
    per = measure_activation_bytes(LlamaForCausalLM(small).to(torch.bfloat16), torch.bfloat16)
    kept = per["full"] * args.target_layers * args.tokens
    recompute = per["none"] * args.tokens
    return {"mode": "full", "layers": args.target_layers, "state_bytes": state, "kept_bytes": kept,
            "recompute_bytes": recompute, "peak_bytes": state + kept + recompute,
            "params": sum(p.numel() for p in meta.parameters()), "per_token_layer": per}


# ----------------------------------------------------------------------------- extrapolation and report


def extrapolate(points: dict[int, float], target: int) -> tuple[float, float, float, float | None]:
    """(value at ``target`` layers, per layer, fixed part, largest residual) of the least-squares line through
    the values at two or more depths (exact through two; the residual, None for two, says how straight it is)."""
    xs = np.array(sorted(points), dtype=float)
    ys = np.array([points[int(x)] for x in xs], dtype=float)
    per, fixed = np.polyfit(xs, ys, 1)
    residual = float(np.max(np.abs(per * xs + fixed - ys))) if len(xs) > 2 else None
    return float(fixed + per * target), float(per), float(fixed), residual


def child_process(script: str, child: str, passthrough: list[str], timeout: float) -> dict:
    """``script --child CHILD ...`` in a fresh process, so that its peak RSS is its own: the JSON of its
    last output line, or ``{"error": its last error line}``."""
    argv = [sys.executable, script, "--child", child, *passthrough]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(mode: str, layers: int, args) -> dict:
    """``measure`` in a fresh process."""
    return {"mode": mode, "layers": layers,
            **child_process(str(Path(__file__).resolve()), f"{mode}:{layers}", args.passthrough, args.per_run)}


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f} GiB"


def _secs(x) -> str:
    return "n/a" if x is None else f"{x:.1f} s"


def report(results: list[dict], full: dict, args) -> dict:
    """Print the table, the ratios and the verdict; returns the summary (also the --json content)."""
    target, budget = args.target_layers, args.budget_gib * GIB
    print(f"| mode | layers | peak memory | model held after build | state estimate (state_bytes) | "
          f"step time | how |")
    print("|---|---:|---:|---:|---:|---:|---|")
    summary = {"target_layers": target, "tokens": args.tokens, "rows": [], "full": full}
    at_target = {}
    for mode in args.modes:
        rows = {r["layers"]: r for r in results if r["mode"] == mode}
        for layers, r in sorted(rows.items()):
            if r.get("error"):
                print(f"| {MODE_NAMES[mode]} | {layers} | failed: {r['error']} | | | | |")
                continue
            print(f"| {MODE_NAMES[mode]} | {layers} | {_gib(r['peak_bytes'])} | {_gib(r['held_bytes'])} | "
                  f"{_gib(r['state_bytes'])} | {_secs(r['step_s'])} | measured |")
            summary["rows"].append({**r, "how": "measured"})
        good = {n: r for n, r in rows.items() if not r.get("error") and r["peak_bytes"] is not None}
        if target in good:
            at_target[mode] = {**good[target], "how": "measured"}
        elif len(good) >= 2:
            row = {"mode": mode, "layers": target, "how": f"extrapolated from {', '.join(map(str, sorted(good)))}"}
            for key in ("peak_bytes", "held_bytes", "state_bytes", "step_s"):
                pts = {n: r[key] for n, r in good.items() if r.get(key) is not None}
                row[key] = extrapolate(pts, target)[0] if len(pts) >= 2 else None
            row["per_layer_peak"], row["fixed_peak"], row["fit_residual"] = extrapolate(
                {n: r["peak_bytes"] for n, r in good.items()}, target)[1:]
            at_target[mode] = row
            print(f"| {MODE_NAMES[mode]} | {target} | {_gib(row['peak_bytes'])} | {_gib(row['held_bytes'])} | "
                  f"{_gib(row['state_bytes'])} | {_secs(row['step_s'])} | **{row['how']}** |")
            summary["rows"].append(row)
    print(f"| {MODE_NAMES['full']} | {target} | {_gib(full['peak_bytes'])} | | {_gib(full['state_bytes'])} | | "
          f"**computed**: state + {_gib(full['kept_bytes'])} checkpointed inputs + {_gib(full['recompute_bytes'])} "
          f"one layer recomputed |")
    print()
    for mode, r in at_target.items():
        if "per_layer_peak" in r:
            fit = "" if r["fit_residual"] is None else \
                f"; the line misses the measured peaks by at most {r['fit_residual'] / GIB:.3f} GiB"
            print(f"{MODE_NAMES[mode]}: peak {r['per_layer_peak'] / GIB:.3f} GiB per decoder layer + "
                  f"{r['fixed_peak'] / GIB:.3f} GiB fixed (embedding, head, loss, libraries){fit}")
    ratios = {}
    if "lora" in at_target:
        ratios["lora/full"] = at_target["lora"]["peak_bytes"] / full["peak_bytes"]
    if "qlora" in at_target:
        ratios["qlora/full"] = at_target["qlora"]["peak_bytes"] / full["peak_bytes"]
    if "qlora8" in at_target:
        ratios["qlora8/full"] = at_target["qlora8"]["peak_bytes"] / full["peak_bytes"]
    if "qlora" in at_target and "qlora8" in at_target:
        ratios["qlora8/qlora"] = at_target["qlora8"]["peak_bytes"] / at_target["qlora"]["peak_bytes"]
    if "lora" in at_target and "qlora" in at_target:
        ratios["qlora/lora"] = at_target["qlora"]["peak_bytes"] / at_target["lora"]["peak_bytes"]
        if at_target["lora"].get("step_s") and at_target["qlora"].get("step_s"):
            ratios["qlora/lora step time"] = at_target["qlora"]["step_s"] / at_target["lora"]["step_s"]
    for depth in sorted({r["layers"] for r in results if not r.get("error")}):
        by = {r["mode"]: r for r in results if r["layers"] == depth and not r.get("error")}
        if "lora" in by and "qlora" in by and by["lora"]["peak_bytes"]:
            ratios[f"qlora/lora at {depth} layers (measured)"] = by["qlora"]["peak_bytes"] / by["lora"]["peak_bytes"]
        if "qlora" in by and "qlora8" in by and by["qlora"]["peak_bytes"]:
            ratios[f"qlora8/qlora at {depth} layers (measured)"] = \
                by["qlora8"]["peak_bytes"] / by["qlora"]["peak_bytes"]
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}")
    summary["ratios"] = ratios
    for mode in ("qlora", "qlora8"):
        if mode not in at_target:
            continue
        r = at_target[mode]
        fits = r["peak_bytes"] <= budget
        summary.setdefault("verdicts", {})[mode] = {"peak_bytes": r["peak_bytes"], "budget_bytes": budget,
                                                    "fits": fits, "how": r["how"]}
        print(f"verdict: {MODE_NAMES[mode]}, {target} layers x {args.tokens} tokens: peak {_gib(r['peak_bytes'])} "
              f"({r['how']}) vs the {args.budget_gib:g} GiB goal: {'UNDER' if fits else 'OVER'}; "
              f"step {_secs(r.get('step_s'))} on {args.device}")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="7b: InternLM2-7B widths; tiny: checks")
    p.add_argument("--layers", default=None, help="decoder layers measured, comma separated (default 1,2,4)")
    p.add_argument("--target-layers", type=int, default=32, help="depth reported (32 = InternLM2-7B)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the one packed row")
    p.add_argument("--modes", default="lora,qlora",
                   help="measured modes, of lora, qlora, qlora8 (QLoRA with AdamW8bit); full is always computed")
    p.add_argument("--ac", choices=("full", "selective", "none", "auto"), default="full",
                   help="activation checkpointing (default full: what 'auto' picks on the CPU and on 8 GB)")
    p.add_argument("--fsdp", choices=("on", "off"), default="on",
                   help="on: FSDP2 on a one-process group, as evotune train on one GPU; off: the plain module "
                        "(frozen base bf16, adapter fp32), to see what FSDP adds")
    p.add_argument("--loss-chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help="SupervisedFinetune(loss_chunk_tokens=): tokens per chunk of the fused loss")
    p.add_argument("--cpu-matmul", choices=("bf16", "fp32"), default="bf16",
                   help="fp32: compute bf16 CPU matrix products in fp32 blocks (bench/cpu_matmul.py), for CPUs "
                        "without AVX512-BF16/AMX, where bf16 backward products run at ~0.3 GFLOP/s")
    p.add_argument("--warmup", type=int, default=1, help="steps before the timed ones (the first allocates AdamW)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (median)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: all cores)")
    p.add_argument("--budget-gib", type=float, default=8.0, help="the goal for QLoRA's peak (XTuner: 8 GB)")
    p.add_argument("--per-run", type=int, default=3600, help="seconds before a measuring process is stopped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # MODE:LAYERS, one measurement
    args = p.parse_args(argv)
    args.layers = [int(x) for x in (args.layers or "1,2,4").split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in ("lora", "qlora", "qlora8")]
    if unknown:
        p.error(f"--modes {','.join(unknown)}: measured modes are lora, qlora and qlora8 (full is computed)")
    if args.cpu_matmul == "fp32" and not args.device.startswith("cpu"):
        p.error(f"--cpu-matmul fp32 routes CPU products only; with --device {args.device} leave it out")
    args.passthrough = ["--device", args.device, "--shape", args.shape, "--tokens", str(args.tokens),
                        "--ac", args.ac, "--fsdp", args.fsdp, "--warmup", str(args.warmup), "--steps", str(args.steps),
                        "--seed", str(args.seed), "--loss-chunk-tokens", str(args.loss_chunk_tokens),
                        "--cpu-matmul", args.cpu_matmul] \
        + (["--threads", str(args.threads)] if args.threads else [])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        mode, layers = args.child.split(":")
        print(json.dumps(measure(mode, int(layers), args)))
        return 0
    from train_throughput import commit, machine

    command = f"python {shlex.join([os.path.relpath(sys.argv[0], REPO)] + (argv or sys.argv[1:]))}"
    shape = SHAPES[args.shape]
    print(f"# LoRA / QLoRA memory: InternLM2 {args.shape} widths (hidden {shape['hidden_size']}, FFN "
          f"{shape['intermediate_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, vocab "
          f"{shape['vocab_size']:,}), one packed row of {args.tokens} tokens, bf16 compute; LoRA r={LORA['r']} "
          f"alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} on every decoder linear layer; QLoRA NF4 + "
          f"double quant; activation checkpointing {args.ac}; FSDP2 {args.fsdp}; loss chunks of "
          f"{args.loss_chunk_tokens} tokens; AdamW on the adapter (qlora8: AdamW8bit); {args.warmup} warm-up + "
          f"{args.steps} timed steps")
    if args.cpu_matmul == "fp32":
        print("# bf16 CPU matrix products computed in fp32 blocks of 2048 (bench/cpu_matmul.py): the same tensors "
              "kept, at most 48 MiB more transients per product")
    print(f"# measured: layers {','.join(map(str, args.layers))}, each mode and depth in its own process; "
          f"reported at {args.target_layers} layers")
    print(f"# memory: {PeakMemory(device).method}, above the process before the model is built")
    print(f"# machine: {machine(device)}; torch {torch.__version__}; commit {commit()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# command: {command}")
    print()
    results = []
    for mode in args.modes:
        for layers in args.layers:
            t = time.perf_counter()
            r = _child(mode, layers, args)
            print(f"# {MODE_NAMES[mode]} x{layers}: {time.perf_counter() - t:.0f} s"
                  + (f", losses {', '.join(f'{x:.3f}' for x in r['losses'])}" if "losses" in r else "")
                  + (f"; {'; '.join(r['notes'])}" if r.get("notes") else ""), flush=True)
            results.append(r)
    print()
    summary = report(results, full_finetune(args), args)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "commit": commit(), "machine": machine(device),
                                               "results": results, **summary}, indent=1, default=str) + "\n")
    return 0 if summary.get("verdicts") or not {"qlora", "qlora8"} & set(args.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
