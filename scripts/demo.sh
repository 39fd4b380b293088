#!/usr/bin/env bash
# The main job end to end on an embedded default: a tiny Wan model and sample clips made here,
# prepare -> train -> export, then the adapter loaded into a fresh WanPipeline for a sample video.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
RECIPE=recipes/wan/tiny_demo.toml
OUT=runs/demo
rm -rf "$OUT"
export WANDB_MODE="${WANDB_MODE:-offline}"

vidlora make-tiny wan "$OUT/model"
vidlora make-clips "$OUT/clips"
vidlora prepare "$RECIPE"
vidlora train "$RECIPE"
vidlora report "$OUT/run"
vidlora export "$OUT/run" --format kohya --dtype bf16 --out "$OUT/kohya_lora.safetensors"
vidlora sample "$RECIPE" --lora "$OUT/run/pytorch_lora_weights.safetensors" \
    --prompt "a blue square moves left over a gradient" --frames 17 --height 64 --width 64 --steps 8 \
    --out "$OUT/sample.mp4"

cat <<DONE

Demo finished. Everything is under $OUT/:
  model/                              tiny random Wan 2.1 model (diffusers layout)
  clips/                              sample clips with .txt captions
  cache/                              latent + text caches, report.json
  run/                                checkpoints/, metrics.jsonl, wandb/ (offline)
  run/report.html                     the run and its dataset on one page: open it in a browser
  run/pytorch_lora_weights.safetensors  the adapter (diffusers: pipe.load_lora_weights)
  run/run_comfyui.safetensors         the same adapter for ComfyUI (written by train: export.formats)
  kohya_lora.safetensors              the same for kohya/musubi tools, from "vidlora export" (bf16)
  sample.mp4                          a video from WanPipeline with the adapter loaded
DONE
