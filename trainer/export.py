"""`vidlora export`: an adapter from a run or checkpoint, written in the format a tool loads."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import find_adapter, read_adapter
from trainer.config import UserError
from trainer.formats import check_lora, export_lora, save_lora
from trainer.models.base import DTYPES


def export_adapter(src: str | Path, out: str | Path, fmt: str = "diffusers", dtype: str = "bf16") -> Path:
    """Read the adapter of `src` (run, checkpoint or adapter file) and write `out` in `fmt`, with its
    training metadata in the safetensors header; the file is checked (finite, every key mapped)."""
    path = find_adapter(src)
    sd, meta = read_adapter(path)
    family = meta.get("family")
    if not family:
        raise UserError(f"{path}: not a vidlora adapter (no family in its header); use `vidlora convert`")
    tensors = export_lora(sd, meta.get("alphas") or meta["alpha"], family, fmt)
    tensors = {
        k: v.to(DTYPES[dtype]) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()
    }
    check_lora(tensors, family)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != "alphas"}
    save_lora(out, tensors, {**meta, "export_format": fmt, "dtype": dtype, "source": str(path)})
    return out
