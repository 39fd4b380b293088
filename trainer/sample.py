"""`vidlora sample`: a video from the family's own diffusers pipeline, optionally with a LoRA loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.media import write_video
from trainer.config import Recipe, resolve_device_precision
from trainer.models import get_family
from trainer.models.base import DTYPES


def sample(
    recipe: Recipe,
    prompt: str,
    out: str | Path,
    lora: str | Path | list | None = None,
    frames: int = 17,
    height: int = 480,
    width: int = 832,
    steps: int = 30,
    seed: int = 0,
    fps: float | None = None,
    image: str | Path | None = None,
) -> Path:
    """Generate with `pipeline_class.from_pretrained` + `load_lora_weights`: exactly what a user of
    diffusers runs, so the sample shows what the exported adapter does outside vidlora. `lora` is a diffusers-format
    file, several (one per expert), or a run folder; `image` is the first frame for image-to-video families."""
    family = get_family(recipe.model)
    _, dtype = resolve_device_precision(recipe.train.mixed_precision, recipe.model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = family.sample_kwargs(image, height, width)  # before loading: a missing --image fails fast
    pipe = family.load_pipeline(DTYPES[dtype])
    if lora:
        from trainer.export import pipeline_adapters

        family.load_adapters(pipe, pipeline_adapters(family, lora))
    pipe.to(device)
    pipe.set_progress_bar_config(desc="sample")
    video = pipe(
        prompt=prompt,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator(device).manual_seed(seed),
        output_type="np",
        **extra,
    ).frames[0]
    pixels = (np.clip(np.asarray(video), 0, 1) * 255).round().astype(np.uint8)
    return write_video(out, pixels, fps=fps or family.native_fps)
