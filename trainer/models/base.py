"""The seam every model family implements: one subclass of `ModelFamily` per file in trainer/models/.

The training loop, the cache writer and export only talk to this interface, so a new family is one file
plus one line in the registry. Diffusers does the heavy lifting: components load with `from_pretrained`,
prompts are encoded by the family's own pipeline (built without transformer and VAE), so training sees
exactly what inference feeds the transformer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import nn

from trainer.config import ModelSection

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelFamily:
    """A model family: how to load it, what to cache for it, and how to call its transformer."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    transformer_class: ClassVar[type[nn.Module]]
    vae_class: ClassVar[type[nn.Module]]
    default_shift: ClassVar[float]  # flow-matching timestep shift used when the recipe sets none
    native_fps: ClassVar[float]  # frame rate the model was trained at; clips are resampled to it by default
    lora_presets: ClassVar[dict[str, str | list[str]]]  # peft target_modules per preset name; "default" required
    text_keys: ClassVar[tuple[str, ...]]  # tensors a text cache entry holds
    sample_defaults: ClassVar[dict[str, Any]] = {}  # extra pipeline arguments for validation samples

    def __init__(self, cfg: ModelSection):
        self.cfg = cfg

    # --- loading -------------------------------------------------------------------------------------
    def _from_pretrained(self, cls: Any, subfolder: str, dtype: torch.dtype) -> Any:
        return cls.from_pretrained(self.cfg.path, subfolder=subfolder, revision=self.cfg.revision, dtype=dtype)

    def load_transformer(self, dtype: torch.dtype) -> nn.Module:
        """The transformer from the diffusers folder, or from an original single-file checkpoint."""
        if self.cfg.transformer_file:
            return self.transformer_class.from_single_file(
                self.cfg.transformer_file, config=self.cfg.path, subfolder="transformer", dtype=dtype
            )
        return self._from_pretrained(self.transformer_class, "transformer", dtype)

    def load_vae(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self._from_pretrained(self.vae_class, "vae", dtype)

    def load_text_pipeline(self, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
        """The family's pipeline with tokenizers and text encoders only (no transformer, no VAE)."""
        return self.pipeline_class.from_pretrained(
            self.cfg.path, revision=self.cfg.revision, transformer=None, vae=None, dtype=dtype
        )

    def load_pipeline(self, transformer: nn.Module, dtype: torch.dtype) -> DiffusionPipeline:
        """A full pipeline around a given (LoRA-wrapped) transformer, for validation samples."""
        return self.pipeline_class.from_pretrained(
            self.cfg.path, revision=self.cfg.revision, transformer=transformer, dtype=dtype
        )

    # --- caching -------------------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B,3,F,H,W] in [-1, 1] -> {"latents": normalised latents [B,C,f,h,w], ...conditions}."""
        raise NotImplementedError

    def encode_prompts(self, text_pipe: DiffusionPipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """One dict of tensors per prompt (named by `text_keys`), trimmed of padding to keep caches small."""
        raise NotImplementedError

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad and stack cached text tensors into the batch the transformer expects."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------------
    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's flow prediction (noise - data) for noisy latents at `sigmas` in (0, 1)."""
        raise NotImplementedError

    def validation_kwargs(
        self, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None
    ) -> dict[str, Any]:
        """Pipeline arguments that stand in for the prompt (and negative prompt): the cached embeddings,
        batched as the transformer sees them in training, so validation never loads the text encoder."""
        kwargs: dict[str, Any] = dict(self.collate_text([text]))
        if negative is not None:
            kwargs.update({f"negative_{k}": v for k, v in self.collate_text([negative]).items()})
        return kwargs

    # --- tiny models for the demo and the tests ------------------------------------------------------
    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        """Write a tiny randomly initialised model folder that `pipeline_class.from_pretrained` loads."""
        raise NotImplementedError


def pad_stack(tensors: list[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Stack [L_i, ...] tensors, zero-padding dim 0 on the right to `length` (default: the longest)."""
    length = length or max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : min(length, t.shape[0])] = t[:length]
    return out
