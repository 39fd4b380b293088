"""Aspect-ratio buckets: train each clip near its own shape at a fixed pixel budget.

Sides are multiples of 16 because the VAE downsamples 8x and the transformer patches 2x2. Every bucket's
area is at most the budget (resolution²), so memory per sample is predictable whatever the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def bucket_sizes(
    resolution: int | tuple[int, int],
    min_side: int = 16,
    max_ratio: float = 2.0,
    step: int = 16,
) -> list[tuple[int, int]]:
    """(width, height) buckets with sides divisible by `step` and area <= the budget, as close to it as the
    step allows; landscape, square and portrait, sorted by aspect ratio (width / height).

    resolution: a side (256, 480, 720: budget side²) or (width, height) (budget width * height; that size
        itself is a bucket when its sides are multiples of `step`). For several resolutions, call once each.
    max_ratio: the longest side is at most this times the shortest; wider clips are centre-cropped.
    """
    area = resolution * resolution if isinstance(resolution, int) else resolution[0] * resolution[1]
    if area < step * step or max_ratio < 1 or min_side < 1:
        raise ValueError(f"no buckets for resolution={resolution}, min_side={min_side}, max_ratio={max_ratio}")
    sizes = set()
    for short in range(step, math.isqrt(area) + 1, step):
        long = area // short // step * step  # the largest long side that keeps the area within budget
        if short >= min_side and long / short <= max_ratio:
            sizes |= {(long, short), (short, long)}
    if not sizes:
        raise ValueError(f"no buckets for resolution={resolution}, min_side={min_side}, max_ratio={max_ratio}")
    return sorted(sizes, key=lambda s: s[0] / s[1])


def choose_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio, measured as |log(ratio)| so 2:1 and 1:2 are equally far from 1:1;
    ties go to the larger bucket."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale uint8 [N,H,W,3] frames to cover `size` = (width, height), then centre-crop to exactly that.

    torch's antialiased bicubic (Pillow's kernel, widened with the scale factor so 1080p sources do not
    alias) on the uint8 batch: measured ~7x faster than Pillow frame by frame (81 frames 1280x720 ->
    832x480: 0.15 s vs 1.1 s on 2 cores).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N,H,W,3], got {frames.dtype} {frames.shape}")
    frames = np.require(frames, requirements="CW")  # torch warns on read-only arrays (e.g. np.asarray(PIL image))
    height, width = frames.shape[1:3]
    out_w, out_h = size
    scale = max(out_w / width, out_h / height)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)
        frames = x.permute(0, 2, 3, 1).numpy()
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return np.ascontiguousarray(frames[:, top : top + out_h, left : left + out_w])
