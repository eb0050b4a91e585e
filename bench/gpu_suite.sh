#!/usr/bin/env bash
# Every throughput path and shape of bench/train_throughput.py in one call, one table (docs/performance.md).
#
#   bench/gpu_suite.sh                        # CUDA: llama-1b @ 16k, 7b-proxy @ 4k and @ 32k; paths a, b, c, d
#   bench/gpu_suite.sh --wheels .whl          # first: pip install --no-index --no-deps from that folder only
#   bench/gpu_suite.sh --device cpu --quick   # the same runs on the CPU with the tiny model (checks the script)
#
# (b) runs on llama-1b only. Installs nothing unless --wheels names a folder of wheels (liger-kernel, flash-attn, flash-attn-4 and their
# dependencies, carried to a machine that cannot download); then only from that folder, into a temporary
# target on PYTHONPATH. Each shape runs as two processes: paths a, b, c together (same process, same
# pre-warm), and path d alone (with liger-kernel installed it patches transformers' Llama module as TRL
# does). Where flash-attn or flash-attn-4 import, (a) also runs once with each varlen kernel pinned, so the
# table shows which is fastest. A path that runs out of memory is a row saying so; a process is stopped after
# --per-run seconds. Prints one table (path, shape, tokens/s, MFU, peak memory, syncs/step, loss check across
# the processes of a shape) and the ratios a/d; writes gpu_suite.json and gpu_suite.log under $OUT when set.
# Last, bench/lora_memory.py: LoRA bf16 / QLoRA NF4 peak memory and step time of the whole InternLM2-7B at 2k
# tokens (its table, ratios and verdict; lora_memory.json under $OUT), allowed 10 x --per-run seconds.
set -uo pipefail

DEVICE=cuda QUICK=0 WHEELS="" PER_RUN=120 STEPS="" PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --per-run) PER_RUN=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (use --device, --quick, --wheels DIR, --per-run S, --steps N)" >&2
           exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=${OUT:+$OUT/gpu_suite.log}
LOG=${LOG:-$WORK/gpu_suite.log}
export PYTHONUNBUFFERED=1

if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl || { echo "gpu_suite.sh: could not install the wheels in $WHEELS" >&2; exit 2; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$QUICK" = 1 ]; then
    SHAPES=("tiny 256" "tiny 512")
    STEP_ARGS=(--warmup 1 --steps "${STEPS:-2}")
else
    SHAPES=("llama-1b 16384" "7b-proxy 4096" "7b-proxy 32768")
    STEP_ARGS=(--warmup 2 --steps "${STEPS:-4}")
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, torch
print("# torch", torch.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for name in ("transformers", "liger_kernel", "flash_attn", "flash_attn.cute"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:
        found = False
    print(f"# {name}: {'importable' if found else 'absent'}")
EOF
KERNELS=$("$PY" -c "import sys; sys.path.insert(0, '$HERE/..'); from evotune.model import attention; \
print(' '.join(attention.available_kernels()) if __import__('torch').cuda.is_available() else '')" 2>/dev/null)

run() {  # run NAME ARGS...: one bench process, its JSON in $WORK/NAME.json
    local name=$1; shift
    echo "## $name: python bench/train_throughput.py $*" | tee -a "$LOG"
    timeout "$PER_RUN" "$PY" "$HERE/train_throughput.py" --device "$DEVICE" "${STEP_ARGS[@]}" "$@" \
        --json "$WORK/$name.json" >>"$LOG" 2>&1
    local rc=$?
    echo "$name $rc" >>"$WORK/runs.txt"
    [ $rc -eq 0 ] || echo "## $name: exit $rc (see the log)" | tee -a "$LOG"
}

start=$(date +%s)
for shape in "${SHAPES[@]}"; do
    set -- $shape
    model=$1 length=$2 tag="$1-$(( $2 / 1024 ))k"
    [ "$QUICK" = 1 ] && tag="$1-$2"
    paths=abc
    [ "$model" = 7b-proxy ] && paths=ac  # (b), the no-varlen ablation, on llama-1b only: it keeps the call short
    run "$tag-$paths" --model "$model" --packed-length "$length" --paths $paths
    run "$tag-d" --model "$model" --packed-length "$length" --paths d
    if [ "$model" = llama-1b ]; then
        for kernel in $KERNELS; do
            [ "$kernel" = torch ] || run "$tag-a-$kernel" --model "$model" --packed-length "$length" --paths a \
                --attn-kernel "$kernel"
        done
    fi
done
# LoRA / QLoRA peak memory and step time, InternLM2-7B at 2k tokens, all 32 layers measured (docs/performance.md)
lora=(--layers 32); [ "$QUICK" = 1 ] && lora=(--shape tiny --tokens 256 --layers 1,2 --steps 1)
echo "## lora-memory: python bench/lora_memory.py --device $DEVICE ${lora[*]}" | tee -a "$LOG"
timeout $(( PER_RUN * 10 )) "$PY" "$HERE/lora_memory.py" --device "$DEVICE" "${lora[@]}" \
    ${OUT:+--json "$OUT/lora_memory.json"} 2>&1 | tee -a "$LOG" | grep -E '^(\||ratio|verdict)'
echo "## suite: $(( $(date +%s) - start )) s" | tee -a "$LOG"

"$PY" - "$WORK" "${OUT:-}" <<'EOF' | tee -a "$LOG"
import glob, json, os, sys
from collections import defaultdict

work, out = sys.argv[1], sys.argv[2]
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(work, "*.json")))]
rows = [dict(r, machine=run["machine"], commit=run["commit"], command=run["command"]) for run in runs
        for r in run["rows"]]
tolerance = {"float32": 2e-5, "bfloat16": 3e-2}
by_shape = defaultdict(dict)
for r in rows:
    by_shape[r["shape"]].setdefault(r["key"], r)  # the first (a) of a shape: the default one
checks, ratios = {}, {}
for shape, paths in by_shape.items():
    same = [k for k in "acd" if k in paths and paths[k].get("losses")]
    if len(same) >= 2:
        ref = paths[same[0]]["losses"]
        worst = max(abs(x - y) / abs(y) for k in same[1:] for x, y in zip(paths[k]["losses"], ref))
        checks[shape] = (worst, worst <= tolerance[runs[0]["dtype"]])
    if "a" in paths and "d" in paths and paths["a"].get("tps") and paths["d"].get("tps"):
        ratios[shape] = paths["a"]["tps"] / paths["d"]["tps"]
print()
print(f"machine: {runs[0]['machine'] if runs else '?'}; commit {runs[0]['commit'] if runs else '?'}")
print("| path | shape | real tokens/s | MFU | peak memory | host syncs/step | loss check |")
print("|---|---|---:|---:|---:|---:|---|")
for r in rows:
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r.get("peak") is None else f"{r['peak'] / 2**30:.2f} GiB"
    check = "n/a"
    if r["shape"] in checks and r["key"] in "acd":
        worst, ok = checks[r["shape"]]
        check = f"{'ok' if ok else 'DIFFERENT'} ({worst:.1e})"
    tps = r["error"] if r.get("error") else f"{r['tps']:,.0f}"
    print(f"| {r['name']} | {r['shape']} | {tps} | {mfu} | {mem} | {r.get('syncs', 'n/a')} | {check} |")
for line in open(os.path.join(work, "runs.txt")):
    name, rc = line.split()
    if rc != "0":
        print(f"| {name} | | process failed (exit {rc}{', stopped at --per-run' if rc == '124' else ''}) | | | | |")
print()
for shape, ratio in ratios.items():
    print(f"{shape}: a/d = {ratio:.2f}x")
print("loss check: largest relative difference of the step losses of (a), (c), (d) of a shape "
      f"(tolerance {tolerance})")
if out:
    json.dump({"runs": runs, "loss_checks": checks, "ratios_a_d": ratios},
              open(os.path.join(out, "gpu_suite.json"), "w"), indent=1)
EOF
