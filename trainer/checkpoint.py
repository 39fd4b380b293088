"""Run folder layout, atomic checkpoints and the adapter file every checkpoint carries.

    RUN/recipe.toml               the resolved recipe
    RUN/metrics.jsonl             one line per logged step
    RUN/checkpoints/step-000250/  accelerate state (LoRA weights only, optimizer, RNG)
                                  + adapter.safetensors (canonical peft keys, alphas and training metadata)
                                  + trainer_state.json (position in the data, LR scheduler)
    RUN/checkpoints/latest        name of the newest complete checkpoint
    RUN/adapter.safetensors       the final adapter
    RUN/pytorch_lora_weights.safetensors   the final adapter in diffusers format

A checkpoint is written into a temp folder, fsynced and renamed, and `latest` moves only after that:
a kill at any moment leaves the previous checkpoint usable. Old ones are pruned only afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict

from data.cache import atomic_write
from trainer.formats import alphas_from_model, load_lora, save_lora

ADAPTER = "adapter.safetensors"
STATE = "trainer_state.json"


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical peft keys (`blocks.0.attn1.to_q.lora_A.weight`), cloned to fp32 on the CPU."""
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    save_lora(path, lora_state_dict(model), {**meta, "alphas": alphas_from_model(model)})


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(canonical LoRA, metadata with JSON values decoded) of an adapter file."""
    sd, raw = load_lora(path)
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return sd, meta


def find_adapter(src: str | Path) -> Path:
    """An adapter file from a file, a checkpoint folder, or a run folder (final adapter, else latest)."""
    src = Path(src)
    if src.is_file():
        return src
    if (src / ADAPTER).is_file():
        return src / ADAPTER
    checkpoint = latest_checkpoint(src / "checkpoints")
    if checkpoint is not None:
        return checkpoint / ADAPTER
    raise FileNotFoundError(f"{src}: no {ADAPTER} here, in a checkpoint, or in a run's checkpoints/")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete; else the newest complete one; else None."""
    folder = Path(folder)
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if (named / ADAPTER).is_file():
            return named
    done = sorted(p for p in folder.glob("step-*") if (p / ADAPTER).is_file())
    return done[-1] if done else None


def save_checkpoint(
    accelerator: Any, folder: Path, step: int, model: torch.nn.Module, meta: dict, keep: int, state: dict
) -> Path:
    """Save accelerate state + adapter + `state` (JSON: position, scheduler) atomically; only the main
    process renames, updates and prunes. Our own state is JSON so resuming never unpickles anything."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_adapter(tmp / ADAPTER, accelerator.unwrap_model(model), {**meta, "steps": step})
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(folder / "latest", lambda p: Path(p).write_text(final.name))
        for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
