"""`vidlora sample`: a video from the family's own diffusers pipeline, optionally with a LoRA loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.buckets import bucket_sizes, choose_bucket
from data.media import write_video
from trainer.config import Recipe, UserError, resolve_device_precision
from trainer.models import get_family
from trainer.models.base import DTYPES


def sample_size(recipe: Recipe, width: int | None, height: int | None, frames: int | None) -> tuple[int, int, int]:
    """(width, height, frames) of a sample: what is given, the rest from what the recipe trains and validates at:
    validation.width/height, else its first training bucket (the first dataset's first resolution, at that
    resolution's own aspect ratio), and validation.num_frames."""
    v = recipe.validation
    width, height = width or v.width, height or v.height
    if width is None or height is None:
        if not recipe.data.datasets:
            raise UserError("the recipe has no [[data.datasets]] to take a sample size from: pass --width and --height")
        ds = recipe.data.datasets[0]
        resolution = ds.resolutions[0]
        aspect = (1, 1) if isinstance(resolution, int) else resolution
        bucket = choose_bucket(*aspect, bucket_sizes(resolution, max_ratio=ds.max_aspect_ratio))
        width, height = width or bucket[0], height or bucket[1]
    return width, height, frames or v.num_frames


def sample(
    recipe: Recipe,
    prompt: str,
    out: str | Path,
    lora: str | Path | list | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 30,
    seed: int = 0,
    fps: float | None = None,
    image: str | Path | None = None,
) -> Path:
    """Generate with `pipeline_class.from_pretrained` + `load_lora_weights`: exactly what a user of
    diffusers runs, so the sample shows what the exported adapter does outside vidlora (LoKr/LoHa, which diffusers
    cannot read, load through peft). `lora` is an adapter file, several (one per expert), or a run folder; `image` is
    the first frame for image-to-video families; sizes not given come from the recipe (`sample_size`)."""
    family = get_family(recipe.model)
    width, height, frames = sample_size(recipe, width, height, frames)
    family.check_shapes([(width, height, frames)], "sample size")
    _, dtype = resolve_device_precision(recipe.train.mixed_precision, recipe.model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = family.sample_kwargs(image, height, width)  # before loading: a missing --image fails fast
    pipe = family.load_pipeline(DTYPES[dtype])
    if lora:
        from trainer.export import load_pipeline_adapters

        load_pipeline_adapters(family, pipe, lora)
    pipe.to(device)
    pipe.set_progress_bar_config(desc="sample")
    video = family.run_pipeline(
        pipe,
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
