"""Peak memory of checkpoint conversion at InternLM2-7B shapes.

Writes a random InternLM2-7B-shaped HF folder (streamed, never whole in
memory), converts it HF -> InternEvo (tp x pp) -> HF with ``evotune convert``,
each conversion in its own process, and records each process's peak resident
memory (``VmHWM``: anonymous + file-backed pages) against the model's size.
The round trip is checked bitwise with per-tensor SHA-256 digests, so the
source can be deleted before the second conversion (disk: two model copies).

    python bench/convert_memory.py --work /tmp/evobench --layers 32 --tp 2 --pp 2

Prints one JSON object (also written to ``<work>/result.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES_7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=92544, rms_norm_eps=1e-5, rope_theta=1000000, max_position_embeddings=32768)

# run in a child: the conversion, then this process's peak RSS
_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
t0 = time.time()
import torch
from evotune.cli import main
base = int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
rc = main({argv!r})
status = {{l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(('VmHWM', 'VmRSS'))}}
print(json.dumps({{"rc": rc, "seconds": time.time() - t0, "peak_rss_kb": status['VmHWM'], "import_rss_kb": base}}))
"""


def internlm2_shapes(shape: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """The weight names and shapes of an InternLM2 checkpoint of ``shape``'s widths and ``layers`` layers."""
    H, inter, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = H // nh
    shapes = {"model.tok_embeddings.weight": (V, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "attention.wqkv.weight": ((nh + 2 * nkv) * d, H), p + "attention.wo.weight": (H, H),
                       p + "feed_forward.w1.weight": (inter, H), p + "feed_forward.w3.weight": (inter, H),
                       p + "feed_forward.w2.weight": (H, inter), p + "attention_norm.weight": (H,),
                       p + "ffn_norm.weight": (H,)})
    shapes.update({"model.norm.weight": (H,), "output.weight": (V, H)})
    return shapes


def write_random_internlm2(path: Path, layers: int, dtype: torch.dtype) -> int:
    """A random 7B-shaped InternLM2 folder, written one tensor at a time; returns the weight bytes."""
    from evotune.checkpoint.hf import write_hf_dir
    from evotune.checkpoint.plan import Planned
    from evotune.dtypes import dtype_name

    shapes = internlm2_shapes(SHAPES_7B, layers)
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return lambda: torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    plan = {k: Planned(s, dtype, rand(s)) for k, s in shapes.items()}
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
           "num_hidden_layers": layers, "hidden_act": "silu", "tie_word_embeddings": False,
           "torch_dtype": dtype_name(dtype), "rope_scaling": None, **SHAPES_7B}
    write_hf_dir(plan, cfg, path, max_shard_bytes=2 * 1024**3)
    return sum(p.nbytes for p in plan.values())


def digests(folder: Path) -> dict[str, str]:
    from evotune.checkpoint.hf import LazyWeights

    weights = LazyWeights(folder)
    out = {}
    for key in weights:
        t = weights[key]
        out[key] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().data).hexdigest()
        del t
    return out


def run_child(argv: list[str]) -> dict:
    code = _CHILD.format(repo=str(REPO), argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="scratch folder (needs ~2 model sizes of disk)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = InternLM2-7B)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = ap.parse_args()

    from evotune.dtypes import parse_dtype

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src, ie, back = work / "hf_src", work / "internevo", work / "hf_back"
    t0 = time.time()
    size = write_random_internlm2(src, args.layers, parse_dtype(args.dtype, what="--dtype"))
    gen_s = time.time() - t0
    want = digests(src)
    to_ie = run_child(["convert", "hf2internevo", str(src), str(ie), "--tp", str(args.tp), "--pp", str(args.pp)])
    if not args.keep:
        shutil.rmtree(src)
    to_hf = run_child(["convert", "internevo2hf", str(ie), str(back), "--max-shard-size", "2GB"])
    got = digests(back)
    result = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB RAM",
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "layers": args.layers, "dtype": args.dtype, "tp": args.tp, "pp": args.pp,
        "model_gib": size / 1024**3,
        "generate_seconds": gen_s,
        "bitwise_round_trip": got == want,
    }
    for name, r in (("hf2internevo", to_ie), ("internevo2hf", to_hf)):
        result[name] = {"seconds": round(r["seconds"], 1),
                        "peak_rss_gib": round(r["peak_rss_kb"] / 1024**2, 2),
                        "import_rss_gib": round(r["import_rss_kb"] / 1024**2, 2),
                        "peak_over_model": round(r["peak_rss_kb"] * 1024 / size, 3)}
    if not args.keep:
        shutil.rmtree(ie)
        shutil.rmtree(back)
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["bitwise_round_trip"] else 1


if __name__ == "__main__":
    sys.exit(main())
