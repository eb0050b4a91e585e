"""Activation memory per token and decoder layer for each activation-checkpointing mode.

    python bench/activation_memory.py                    # llama-1b widths, bf16 autocast, CPU, ~1 minute
    python bench/activation_memory.py --device cuda --tokens 16384

What a training step keeps from forward to backward decides which
checkpointing mode fits a GPU. This builds ``SupervisedFinetune`` at the
``train_throughput.py`` model's widths with 1 and with 3 decoder layers, runs
one forward of a packed row under autocast, and measures the memory still held
after it (``bench/peak_memory.py``: allocator on CUDA, RSS on CPU); the
difference divided by 2 layers and by the tokens is the per-layer, per-token
cost, free of the embedding, head and loss. It then extrapolates to the full
depth and a given packed length. On CPU the attention kernel is the per-document
SDPA, whose saved outputs (output + log-sum-exp) match the CUDA flash kernels'.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import PeakMemory  # noqa: E402
from train_throughput import MODELS, llama_config, make_packs, new_llm, packed_batch  # noqa: E402

from evotune.data.collate import model_inputs  # noqa: E402
from evotune.model.checkpointing import AC_MODES, set_activation_checkpointing  # noqa: E402
from evotune.model.finetune import SupervisedFinetune  # noqa: E402


def kept_after_forward(config, layers: int, mode: str, inputs: dict, device, dtype) -> int:
    model = SupervisedFinetune(new_llm(config, device, 0, layers), activation_checkpointing=False)
    set_activation_checkpointing(model.llm, mode)
    model.train()
    gc.collect()
    with PeakMemory(device) as pm:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs)
        held = pm.held_bytes()
    del loss, model
    gc.collect()
    return held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    p.add_argument("--tokens", type=int, default=4096, help="packed row measured")
    p.add_argument("--target-tokens", type=int, default=16384, help="packed length extrapolated to")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)
    config = llama_config(args.model, max(args.tokens, args.target_tokens))
    config.vocab_size = 1024  # the head and loss are outside the layers; a small vocabulary keeps the run short
    batch = packed_batch(make_packs(1, args.tokens, config.vocab_size, 0)[0], pin=False)
    inputs = model_inputs(batch, device)
    depth = MODELS[args.model]["num_hidden_layers"]
    print(f"# activations kept after forward: {args.model} widths, {args.dtype} "
          f"{'autocast' if dtype != torch.float32 else ''}, row of {args.tokens} tokens, device {device}")
    print(f"# memory: {PeakMemory(device).method}")
    print()
    print(f"| checkpointing | per token per layer | {depth} layers x {args.target_tokens} tokens |")
    print("|---|---:|---:|")
    for mode in AC_MODES:
        per = (kept_after_forward(config, 3, mode, inputs, device, dtype)
               - kept_after_forward(config, 1, mode, inputs, device, dtype)) / 2 / args.tokens
        print(f"| {mode} | {per / 1e3:.1f} KB | {per * depth * args.target_tokens / 2**30:.1f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
