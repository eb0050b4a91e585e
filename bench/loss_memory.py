"""Loss memory: evotune's chunked cross-entropy vs full logits, at 32768 tokens x 92,544 vocab.

    python bench/loss_memory.py                       # CPU, about a minute
    python bench/loss_memory.py --device cuda --full-tokens 8192,16384,32768

Each variant runs forward and backward of ``sum CE(hidden @ W.T, labels) / N``
on fp32 tensors (``hidden`` [N, H] and ``W`` [V, H] require gradients) and its
peak memory above the inputs is measured (see ``bench/peak_memory.py``: CUDA
allocator peak, or on CPU peak RSS). Full logits at 32768 x 92,544 are 12 GB
in fp32 and the full-logits variant needs two to three times that, more than a
24 GB machine has, so on CPU it is measured at smaller token counts and
extrapolated linearly to 32768 (every term is proportional to N; the fit's
residual is printed); its logits alone (N x V x 4 bytes, a bound no full-logits
implementation can go below) are printed too. The chunked variant is measured
at the full 32768 tokens.

The hidden size only adds ``N x H`` and ``V x H`` tensors (and their gradients)
to both sides; it is small by default so that the logits, the subject here,
dominate and the CPU run stays short. Not a test: run it by hand and record
the numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import PeakMemory  # noqa: E402

from evotune.model.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy  # noqa: E402

GB = 1e9


def _full_logits(hidden, weight, labels):
    """What a plain causal-LM loss does: all logits, then cross-entropy."""
    return F.cross_entropy(hidden @ weight.T, labels, reduction="sum") / hidden.shape[0]


def _chunked(chunk_tokens):
    def loss(hidden, weight, labels):
        n = hidden.shape[0]
        return chunked_cross_entropy(hidden, weight, labels, torch.full((n,), 1.0 / n, device=hidden.device),
                                     chunk_tokens=chunk_tokens)
    return loss


def measure(loss_fn, n: int, weight: torch.Tensor, device, seed: int) -> tuple[int | None, float, float]:
    """(peak bytes, seconds, loss) of one forward + backward over n tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, weight.shape[1], generator=g).to(device).requires_grad_()
    labels = torch.randint(0, weight.shape[0], (n,), generator=g).to(device)
    weight.grad = None
    with PeakMemory(device) as pm:
        t = time.perf_counter()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        value = float(loss.detach())  # synchronises on CUDA
        seconds = time.perf_counter() - t
        del loss
    return pm.peak_bytes, seconds, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--vocab", type=int, default=92544)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    p.add_argument("--full-tokens", default="1024,2048,4096",
                   help="token counts at which full logits are measured (comma separated)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    full_tokens = sorted(int(x) for x in args.full_tokens.split(","))

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device).requires_grad_()
    method = PeakMemory(device).method
    print(f"# loss memory: V={args.vocab}, H={args.hidden}, fp32, chunk {args.chunk_tokens} tokens, "
          f"device {device}")
    print(f"# peak memory = {method}")

    rows = []
    full = []
    for n in full_tokens:
        peak, sec, loss = measure(_full_logits, n, weight, device, args.seed + n)
        full.append((n, peak))
        rows.append(("full logits", n, peak, "measured", sec, loss))
    chunked_small = measure(_chunked(args.chunk_tokens), full_tokens[-1], weight, device, args.seed + full_tokens[-1])
    rows.append(("chunked", full_tokens[-1], chunked_small[0], "measured", chunked_small[1], chunked_small[2]))
    peak, sec, loss = measure(_chunked(args.chunk_tokens), args.tokens, weight, device, args.seed + args.tokens)
    chunked_peak = peak
    rows.append(("chunked", args.tokens, peak, "measured", sec, loss))

    if full[-1][0] == args.tokens:
        full_peak, how = full[-1][1], "measured"
        residual = None
    else:
        xs, ys = np.array([n for n, _ in full], float), np.array([b for _, b in full], float)
        slope, intercept = np.polyfit(xs, ys, 1) if len(xs) > 1 else (ys[0] / xs[0], 0.0)
        full_peak = slope * args.tokens + intercept
        residual = float(np.max(np.abs(slope * xs + intercept - ys))) if len(xs) > 2 else None
        how = f"extrapolated from {','.join(str(n) for n, _ in full)}"
        rows.insert(len(full), ("full logits", args.tokens, full_peak, how, float("nan"), float("nan")))
    logits_bytes = args.tokens * args.vocab * 4

    print()
    print("| variant | tokens | peak memory | how | time (s) | loss |")
    print("|---|---:|---:|---|---:|---:|")
    for name, n, b, how_, s, l in rows:
        print(f"| {name} | {n} | {b / GB:.2f} GB | {how_} | {s:.2f} | {l:.4f} |")
    print()
    print(f"full logits alone at {args.tokens} x {args.vocab} fp32: {logits_bytes / GB:.2f} GB "
          f"(a lower bound for any full-logits loss)")
    if residual is not None:
        print(f"linear fit residual over the measured full-logits points: {residual / GB:.3f} GB")
    ratio = chunked_peak / full_peak
    ratio_bound = chunked_peak / logits_bytes
    print(f"chunked / full-logits peak at {args.tokens} tokens: {ratio:.3f} (1/{1 / ratio:.1f}); "
          f"chunked / logits-alone bound: {ratio_bound:.3f} (1/{1 / ratio_bound:.1f})")
    ok = ratio <= 1 / 8
    print(f"goal chunked <= 1/8 of full logits: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
