"""Memory and step time of the optimizer over XTuner's QLoRA adapter on InternLM2-7B: AdamW vs AdamW8bit.

    python bench/optimizer_memory.py                      # CPU: the 7B adapter (151.0 M parameters), 32 layers
    python bench/optimizer_memory.py --layers 2 --steps 2 # seconds: checks the script

The question (issue 15): bench/lora_memory.py puts QLoRA 7B at 2k tokens at 8.18
GiB with XTuner's optimizer (torch's AdamW, two fp32 moments per trained
parameter), over the 8 GiB goal; bitsandbytes' ``AdamW8bit`` keeps the moments
in 8 bits. How much state does each optimizer hold for that adapter, and what
does its step cost? This measures the optimizer alone, because the whole step
of lora_memory.py in bf16 is out of reach of a CPU without AVX512-BF16 (a bf16
matmul runs at about 0.3 GFLOP/s there), while the optimizer works on fp32
tensors on any CPU.

The adapter: LoRA r=64 on every decoder linear layer of a 7B-shaped InternLM2,
shapes taken from evotune itself (``apply_lora`` on a meta-device model loaded
the InternLM2 way, so q, k and v share one A as XTuner's wqkv adapter: 4.72 M
parameters per layer). In each measuring process, after one warm-up step of a
tiny optimizer of the same kind (loads the library code): the adapter's fp32
parameters and gradients are allocated, as FSDP2's DTensors on a one-process
group (``--fsdp on``, what ``evotune train`` has on one GPU) or plain tensors;
then ``--steps`` optimizer steps built by evotune's ``build_optimizer``
(lr 2e-4, betas 0.9/0.999, no weight decay: XTuner's), with fresh random
gradients before each. Reported: the optimizer state's bytes (its tensors,
counted), the peak RSS during the steps above what parameters and gradients
hold (``bench/peak_memory.py``: the state plus the step's transients), and the
median step time after the first (which allocates the state). Not a test: run
by hand, record the output in docs/performance.md ("LoRA and QLoRA memory").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_memory import LORA, OPTIMIZER, child_process, internlm2_config, optimizer_class  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402

GIB = 2**30
OPTIMIZERS = ("adamw", "adamw8bit")


def adapter_shapes(layers: int, shape: str = "7b") -> list[tuple[int, ...]]:
    """The trained parameters' shapes of ``LORA`` on an InternLM2 of ``layers`` layers (meta device)."""
    from transformers import LlamaForCausalLM

    from evotune.checkpoint.internlm2 import llama_config_from_internlm2
    from evotune.checkpoint.source import ModelSource
    from evotune.model.lora import apply_lora

    cfg = internlm2_config(shape, layers, 2048)
    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config_from_internlm2(cfg))
    ModelSource("internlm2", None, cfg).attach(llm)  # as load_model records it: XTuner's wqkv adapter
    with contextlib.redirect_stdout(sys.stderr):
        apply_lora(llm, LORA)
    return [tuple(p.shape) for p in llm.parameters() if p.requires_grad]


def _parameters(shapes, fsdp: bool, mesh, gen: torch.Generator) -> list[torch.nn.Parameter]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)] if fsdp else None  # as FSDP2: shard over the last dim
    params = []
    for s in shapes:
        t = torch.empty(s).normal_(0.0, 0.02, generator=gen)
        p = torch.nn.Parameter(distribute_tensor(t, mesh, placements) if fsdp else t)
        p.grad = torch.zeros_like(p)
        params.append(p)
    return params


def _fill_grads(params, gen: torch.Generator) -> None:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.normal_(0.0, 1e-3, generator=gen)


def _state_bytes(optimizer) -> int:
    def walk(v):
        if isinstance(v, torch.Tensor):
            return v.nbytes
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        return 0
    return sum(walk(s) for s in optimizer.state.values())


def measure(name: str, layers: int, args) -> dict:
    """One process's measurement of optimizer ``name`` over the adapter of ``layers`` layers."""
    from train_throughput import one_process_group

    from evotune.train.optim import build_optimizer

    device = torch.device("cpu")
    spec = {"type": optimizer_class(name == "adamw8bit"), **OPTIMIZER}
    gen = torch.Generator().manual_seed(args.seed)
    group = one_process_group(device) if args.fsdp == "on" else contextlib.nullcontext()
    with group as pmesh:
        mesh = pmesh.mesh if pmesh is not None else None
        fsdp = mesh is not None
        tiny = _parameters([(64, 128)] * 2, fsdp, mesh, gen)  # library code loads on the first step
        warm = build_optimizer(spec, tiny, device)
        _fill_grads(tiny, gen)
        warm.step()
        del tiny, warm
        shapes = adapter_shapes(layers)
        with PeakMemory(device) as since_start:
            params = _parameters(shapes, fsdp, mesh, gen)
            _fill_grads(params, gen)  # written, so resident (zeroed pages are not)
            held = since_start.held_bytes()
            optimizer = build_optimizer(spec, params, device)
            times = []
            with PeakMemory(device) as pm:
                for _ in range(args.steps):
                    _fill_grads(params, gen)
                    t = time.perf_counter()
                    optimizer.step()
                    times.append(time.perf_counter() - t)
            state = _state_bytes(optimizer)
            checksum = float(sum(float(p.detach().float().sum()) for p in params[:4]))
    return {"optimizer": name, "class": type(optimizer).__name__, "layers": layers,
            "params": sum(torch.Size(s).numel() for s in shapes), "tensors": len(shapes),
            "held_bytes": held, "state_bytes": state, "peak_bytes": pm.peak_bytes,
            "step_s": statistics.median(times[1:]) if len(times) > 1 else None, "times": times,
            "first_step_s": times[0], "fsdp": fsdp, "checksum": checksum, "method": pm.method}


def _child(name: str, layers: int, args) -> dict:
    """``measure`` in a fresh process."""
    return {"optimizer": name, "layers": layers,
            **child_process(str(Path(__file__).resolve()), f"{name}:{layers}", args.passthrough, args.per_run)}


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.3f} GiB"


def report(results: list[dict]) -> dict:
    print("| optimizer | layers | trained parameters | parameters + gradients | state (counted) | "
          "peak during steps above them | bytes of state per parameter | step time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ok = {}
    for r in results:
        if r.get("error"):
            print(f"| {r['optimizer']} | {r['layers']} | failed: {r['error']} | | | | | |")
            continue
        ok[(r["optimizer"], r["layers"])] = r
        step = "n/a" if r["step_s"] is None else f"{r['step_s']:.2f} s"
        print(f"| {r['class']} | {r['layers']} | {r['params']:,} | {_gib(r['held_bytes'])} | "
              f"{_gib(r['state_bytes'])} | {_gib(r['peak_bytes'])} | {r['state_bytes'] / r['params']:.3f} | {step} |")
    ratios = {}
    for layers in sorted({k[1] for k in ok}):
        a, b = ok.get(("adamw", layers)), ok.get(("adamw8bit", layers))
        if a and b:
            ratios[f"state adamw8bit/adamw at {layers} layers"] = b["state_bytes"] / a["state_bytes"]
            ratios[f"state saved at {layers} layers (GiB)"] = (a["state_bytes"] - b["state_bytes"]) / GIB
            if a["peak_bytes"] is not None and b["peak_bytes"] is not None:
                ratios[f"peak adamw8bit/adamw at {layers} layers"] = b["peak_bytes"] / a["peak_bytes"]
                ratios[f"peak saved at {layers} layers (GiB)"] = (a["peak_bytes"] - b["peak_bytes"]) / GIB
            if a["step_s"] and b["step_s"]:
                ratios[f"step time adamw8bit/adamw at {layers} layers"] = b["step_s"] / a["step_s"]
    print()
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}")
    return {"ratios": ratios}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the adapter (32 = InternLM2-7B)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="of adamw, adamw8bit")
    p.add_argument("--fsdp", choices=("on", "off"), default="on",
                   help="on: DTensor parameters on a one-process group, as evotune train on one GPU")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the first allocates the state)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: all cores)")
    p.add_argument("--per-run", type=int, default=1800, help="seconds before a measuring process is stopped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # OPTIMIZER:LAYERS, one measurement
    args = p.parse_args(argv)
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        p.error(f"--optimizers {','.join(unknown)}: known are {', '.join(OPTIMIZERS)}")
    args.passthrough = ["--fsdp", args.fsdp, "--steps", str(args.steps), "--seed", str(args.seed)] \
        + (["--threads", str(args.threads)] if args.threads else [])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, layers = args.child.split(":")
        print(json.dumps(measure(name, int(layers), args)))
        return 0
    from train_throughput import commit, machine

    command = f"python {shlex.join([os.path.relpath(sys.argv[0], REPO)] + (argv or sys.argv[1:]))}"
    print(f"# optimizer memory: LoRA r={LORA['r']} on every decoder linear layer of InternLM2-7B widths "
          f"(XTuner's wqkv adapter), {args.layers} layers, fp32 parameters and gradients, FSDP2 {args.fsdp}; "
          f"{args.steps} steps, the first allocates the state")
    print(f"# memory: {PeakMemory('cpu').method}")
    print(f"# machine: {machine(torch.device('cpu'))}; torch {torch.__version__}; commit {commit()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# command: {command}")
    print()
    results = []
    for name in args.optimizers:
        t = time.perf_counter()
        results.append(_child(name, args.layers, args))
        print(f"# {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print()
    summary = report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "commit": commit(), "results": results,
                                               **summary}, indent=1) + "\n")
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
