"""Context parallelism on a machine with 2 or more GPUs (not run by CI, which has none): ring attention (refused on
the CPU) and Ulysses, each 2 processes over NCCL against one process, in bf16 on a tiny Wan whose attention heads
are 64 wide (the fused kernels ring attention needs take no 12-wide heads). Prints the largest relative loss
difference of each kind and exits 1 if one is over 2e-2 (bf16 rounding, summed in another order).

    python -m tests.gpu_context_parallel [WORK_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from tests.conftest import ROOT, run_cli, write_recipe
from tests.training_setup import losses, prepare_cache, recipe_text, train_run

MULTI_GPU = str(ROOT / "recipes/accelerate/multi_gpu.yaml")
KINDS = {"ring": "_native_cudnn", "ulysses": "sdpa"}  # kind -> attention backend


def main(work: Path) -> int:
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs (NCCL takes one process per GPU)")
        return 2
    model = work / "model"
    run_cli("make-tiny", "wan", model)
    config = WanTransformer3DModel.load_config(model / "transformer")
    torch.manual_seed(0)
    WanTransformer3DModel.from_config({**config, "attention_head_dim": 64}).save_pretrained(model / "transformer")
    model, cache = prepare_cache(work, model)
    worst = 0.0
    for kind, backend in KINDS.items():
        runs = {}
        for name, extra in (("one", {}), ("cp", {"context_parallel": 2, "context_parallel_kind": kind})):
            out = work / f"{kind}-{name}"
            keys = {"mixed_precision": "bf16", "attention_backend": backend, "gradient_accumulation": 2, **extra}
            recipe = write_recipe(work / f"{kind}-{name}.toml", recipe_text(model, cache, out, 8, **keys))
            train_run(recipe, MULTI_GPU if name == "cp" else "one", env={"ACCELERATE_USE_CPU": "false"})
            runs[name] = losses(out)
        diff = max(abs(runs["cp"][s] - runs["one"][s]) / abs(runs["one"][s]) for s in runs["one"])
        print(f"{kind} ({backend}): 8 steps, largest relative loss difference to one process {diff:.2e}")
        worst = max(worst, diff)
    return 0 if worst <= 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())))
