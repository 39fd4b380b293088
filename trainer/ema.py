"""EMA of the LoRA weights (`train.ema_decay`): a shadow of every trainable tensor, ``ema = d * ema + (1 - d) * w``
after each optimizer step that changed the weights.

It is saved with every checkpoint (``ema.safetensors``, written by the main process, read by every rank) so a resumed
run continues it exactly, and swapped into the model (:meth:`LoraEMA.applied`) to validate it next to the raw weights
and to export it as the run's adapter (`export.use_ema`). Every process keeps the same shadow: under DDP and ZeRO-2
each holds the whole LoRA (ZeRO-3 and FSDP shard it, and are refused).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from trainer.config import UserError

log = logging.getLogger("vidlora.ema")

EMA_FILE = "ema.safetensors"


class LoraEMA:
    def __init__(self, model: torch.nn.Module, decay: float, on_cpu: bool = False) -> None:
        """``model``: the run's Denoisers (unwrapped), after accelerate prepared it."""
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if any(p.numel() == 0 or isinstance(p.data, DTensor) for p in self.params.values()):
            raise UserError(
                "train.ema_decay does not work with DeepSpeed ZeRO-3 or FSDP (they shard the LoRA); use ZeRO-2 or DDP"
            )
        self.shadow = {
            n: p.detach().to("cpu" if on_cpu else p.device, torch.float32, copy=True) for n, p in self.params.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - self.decay)

    def save(self, path: Path) -> None:
        state = {n: s.detach().cpu().contiguous() for n, s in self.shadow.items()}
        save_file(state, str(path), metadata={"ema_decay": repr(self.decay)})

    def load(self, checkpoint: Path) -> None:
        """Continue the checkpoint's EMA; a checkpoint saved without one starts it from its weights (with a warning)."""
        path = checkpoint / EMA_FILE
        if not path.is_file():
            log.warning("%s has no EMA (train.ema_decay was off): the EMA starts from its weights", checkpoint)
            for name, p in self.params.items():
                self.shadow[name].copy_(p.detach())
            return
        state = load_file(str(path))
        if set(state) != set(self.shadow):
            raise UserError(f"{path}: the EMA does not match this run's LoRA (other targets, rank or kind?)")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA in the model's LoRA weights for the duration (the raw weights come back after)."""
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])
