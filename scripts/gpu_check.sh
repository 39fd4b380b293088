#!/usr/bin/env bash
# The GPU check: on one lent H100/H200-class card, every bench that matters in a few minutes, as one markdown table
# (s/step, MFU, HFU, peak memory) ready for docs/performance.md. Installs nothing; a case whose package or hardware
# is missing is listed as skipped, with why.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run: the whole plan at toy sizes (the small presets, 9 frames at 64x64, one step) on whatever device there is,
# so the script is known to work before a GPU runs it (CI runs it on the CPU). Results: DIR/table.md and DIR/*.json
# (default DIR: gpu_check/, or gpu_check_dry/ for a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "gpu_check: error: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python}"
if [ "$DRY" = 1 ]; then
    OUT="${OUT:-gpu_check_dry}"
    WAN=small; WAN_BIG=small; HV=hunyuan-small
    SIZE=(--frames 9 --height 64 --width 64 --steps 1 --warmup 0 --threads 1 --in-process)
    SPAN=(--set "train.token_routing_blocks=[1,3]")  # the small preset has 4 blocks (the default span is empty)
    LIMIT=300
else
    OUT="${OUT:-gpu_check}"
    WAN=wan-1.3b; WAN_BIG=wan-14b; HV=hunyuan-13b
    SIZE=(--frames 81 --height 480 --width 832 --steps 2 --warmup 1)
    SPAN=()
    LIMIT=240
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/table.md

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
cuda() { "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
fp8() { "$PY" -c "import sys, torch; from trainer.memory import fp8_compute_problem as p
sys.exit(not torch.cuda.is_available() or p(torch.device('cuda')) is not None)" 2>/dev/null; }

SKIPPED="$OUT/skipped.txt"
: > "$SKIPPED"
# case NAME NEEDS MODEL [bench_train.py arguments...]: NEEDS is "-", "cuda", "fp8" or a Python module
case_() {
    local name="$1" needs="$2" model="$3"
    shift 3
    local why=""
    case "$needs" in
        -) ;;
        cuda) cuda || why="needs a CUDA GPU" ;;
        fp8) fp8 || why="needs a GPU with fp8 tensor cores" ;;
        *) has "$needs" || why="$needs is not installed" ;;
    esac
    if [ -n "$why" ]; then
        echo "$name|$model|$why" >> "$SKIPPED"
        echo "gpu_check: $name: skipped ($why)"
        return
    fi
    echo "gpu_check: $name ($model) ..."
    timeout "$LIMIT" "$PY" scripts/bench_train.py --model "$model" --cases vidlora "${SIZE[@]}" "$@" \
        --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "$name|$model|failed or timed out: see $OUT/$name.log" >> "$SKIPPED"
}

CKPT=(--set train.gradient_checkpointing=true)
case_ wan-checkpointing - "$WAN" "${CKPT[@]}"
case_ wan-no-checkpointing - "$WAN"
case_ wan-big-checkpointing - "$WAN_BIG" "${CKPT[@]}"
case_ hunyuan-checkpointing - "$HV" "${CKPT[@]}"
case_ attention-cudnn cuda "$WAN" "${CKPT[@]}" --set train.attention_backend=_native_cudnn
case_ attention-flash3 flash_attn_interface "$WAN" "${CKPT[@]}" --set train.attention_backend=_flash_3
case_ fp8-base - "$WAN" "${CKPT[@]}" --set train.fp8_base=true
case_ fp8-compute fp8 "$WAN" "${CKPT[@]}" --set train.fp8_compute=tensor
case_ token-routing-0.5 - "$WAN" "${CKPT[@]}" --set train.token_routing=0.5 "${SPAN[@]}"
case_ block-offload - "$WAN" --set train.block_offload=true

"$PY" - "$OUT" <<'EOF'
"""One markdown table of every case's s/step, MFU, HFU and peak memory, with its time ratio to the first case."""
import json
import sys
from pathlib import Path

sys.path.insert(0, ".")
from trainer.perf import device_peak_flops  # noqa: E402

out = Path(sys.argv[1])
rows, base, device = [], None, "?"
for path in sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime):
    data = json.loads(path.read_text())
    args = data["args"]
    r = next(r for r in data["results"] if r["case"] == "vidlora")
    if "error" in r:
        rows.append(f"| {path.stem} | {args['model']} | failed: {r['error']} | | | | |")
        continue
    device = r["device"]
    peak = device_peak_flops(device)
    s = r["s_per_step"]
    base = base or s
    mfu = f"{r['model_flops'] / s / peak:.1%}" if peak else "-"
    hfu = f"{r['hardware_flops'] / s / peak:.1%}" if peak else "-"
    mem = r["peak_memory_bytes"] / 2**30
    size = f"{args['frames']}x{args['height']}x{args['width']}"
    rows.append(f"| {path.stem} | {args['model']} {size} | {s:.3f} | {s / base:.2f} | {mfu} | {hfu} | {mem:.2f} GiB |")
for line in (out / "skipped.txt").read_text().splitlines():
    name, model, why = line.split("|", 2)
    rows.append(f"| {name} | {model} | skipped: {why} | | | | |")
table = [
    f"Device: {device}. s/step: median of the timed steps; ratio: to the first row; peak memory: "
    + ("CUDA max allocated." if "CPU" not in device else "peak RSS added (CPU)."),
    "",
    "| case | model, frames x height x width | s/step | ratio | MFU | HFU | peak memory |",
    "| --- | --- | --- | --- | --- | --- | --- |",
    *rows,
]
(out / "table.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
EOF
