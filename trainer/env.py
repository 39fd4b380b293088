"""`vidlora env`: what a bug report needs, in one paste: versions, GPUs and their memory, what the
hardware supports (bf16 on the GPU or the CPU, fp8), and whether DeepSpeed's ops can be built here."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import sys
from typing import Any

PACKAGES = (
    "vidlora",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "decord",
    "av",
    "safetensors",
    "datasets",
    "wandb",
)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpus() -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_gb": round(total / 2**30, 1),
                "free_gb": round(free / 2**30, 1),
                "compute_capability": f"{p.major}.{p.minor}",
                # fp8 matmuls need Ada/Hopper (8.9+); fp8 *storage* (train.fp8_base) works on any GPU
                "fp8_compute": (p.major, p.minor) >= (8, 9),
            }
        )
    return out


def bf16_support() -> tuple[bool, str]:
    """Whether bf16 training runs here, and where: on the GPU if it has bf16, else on the CPU, which always
    runs it (natively with AVX512-BF16 or AMX, otherwise emulated and slow)."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, "cuda" if ok else "cuda: this GPU has no bf16"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(torch.ones(2, 8), torch.ones(4, 8)).sum().item()
    except RuntimeError as e:
        return False, f"cpu: {str(e).splitlines()[0]}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return True, "cpu"
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return True, f"cpu, native ({', '.join(native)})"
    return True, "cpu, emulated and slow: no avx512_bf16 or amx_bf16"


def deepspeed_ops(build: bool = False) -> dict[str, str]:
    """Per op: compatible / incompatible / built (when `build`): DeepSpeed JIT-compiles ops on first use."""
    try:
        from deepspeed.accelerator import get_accelerator
    except Exception as e:
        return {"deepspeed": f"not importable: {type(e).__name__}: {e}"}
    acc = get_accelerator()
    names = ["CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder"]
    out = {"accelerator": acc.device_name()}
    for name in names:
        try:
            builder_cls = acc.get_op_builder(name)
        except Exception:
            builder_cls = None
        if builder_cls is None:
            out[name] = "not available for this accelerator"
            continue
        builder = builder_cls()
        ok = builder.is_compatible(verbose=False)
        status = "compatible" if ok else "incompatible"
        if ok and build:
            try:
                builder.load(verbose=False)
                status = "built"
            except Exception as e:
                status = f"build failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out[name] = status
    return out


def collect(build_ops: bool = False, check_ops: bool = True) -> dict[str, Any]:
    """Everything `vidlora env` prints; `check_ops=False` skips DeepSpeed's op check (an import of ~1 s)."""
    import torch

    bf16 = bf16_support()
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {p: version(p) for p in PACKAGES},
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "nvcc": shutil.which("nvcc"),
        "ninja": shutil.which("ninja"),
        "gpus": gpus(),
        "bf16_supported": bf16[0],
        "bf16": bf16[1],
        "fp8_storage": hasattr(torch, "float8_e4m3fn"),
        "deepspeed_ops": deepspeed_ops(build_ops) if check_ops and version("deepspeed") != "not installed" else {},
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("CUDA_VISIBLE", "ACCELERATE_", "WANDB_MODE", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR"))
        },
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def format_report(info: dict[str, Any]) -> str:
    lines = ["vidlora environment", ""]
    lines += [f"python          {info['python']}", f"platform        {info['platform']}"]
    lines.append(f"cpus / ram      {info['cpu_count']} / {info.get('ram_gb', '?')} GB")
    lines += ["", "packages"] + [f"  {k:14s}{v}" for k, v in info["packages"].items()]
    lines += ["", "hardware"]
    lines.append(f"  cuda          {info['cuda_available']} (torch built for CUDA {info['torch_cuda']})")
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(
                f"  gpu {g['index']}         {g['name']}, {g['memory_gb']} GB ({g['free_gb']} free), "
                f"compute {g['compute_capability']}, fp8 compute {'yes' if g['fp8_compute'] else 'no'}"
            )
    else:
        lines.append("  gpus          none")
    lines.append(f"  bf16          {'yes' if info['bf16_supported'] else 'no'} ({info['bf16']})")
    lines.append(f"  fp8 storage   {'yes' if info['fp8_storage'] else 'no'} (train.fp8_base)")
    lines.append(f"  nvcc / ninja  {info['nvcc'] or 'not found'} / {info['ninja'] or 'not found'}")
    if info["deepspeed_ops"]:
        lines += ["", "deepspeed ops (built on first use; `vidlora env --build-ops` builds them now)"]
        lines += [f"  {k:22s}{v}" for k, v in info["deepspeed_ops"].items()]
    if info["env"]:
        lines += ["", "environment"] + [f"  {k}={v}" for k, v in sorted(info["env"].items())]
    return "\n".join(lines)
