"""Which frames of a clip become training samples: frame-rate resampling and frame windows.

Pure functions of frame counts and timestamps, so a dry run can report every window of every clip
before anything is decoded. Window lengths are 4k+1 because the video VAEs (Wan, HunyuanVideo) compress
time 4x after keeping the first frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("head", "chunk", "slide", "uniform", "full")
_EPS = 1e-6  # seconds; a grid time this close to the middle of two frames is a tie (float error)


def longest_valid(n: int) -> int:
    """Largest 4k+1 that is <= n (n >= 1)."""
    return (n - 1) // 4 * 4 + 1


def check_target_frames(target_frames: Sequence[int]) -> list[int]:
    """Sorted unique lengths, each 4k+1; a ValueError names the nearest valid lengths otherwise."""
    targets = sorted({int(f) for f in target_frames})
    if not targets:
        raise ValueError("target_frames is empty: give at least one length such as 1, 33 or 81")
    for f in targets:
        if f < 1 or f % 4 != 1:
            below, above = longest_valid(max(f, 1)), longest_valid(max(f, 1)) + 4
            raise ValueError(f"target_frames must be 4k+1 (1, 5, 9, ..., 81, ...); got {f}: use {below} or {above}")
    return targets


def resample(timestamps: Sequence[float], target_fps: float | None = None) -> list[int]:
    """Source frame index for every output frame of a uniform `target_fps` grid; None keeps every frame.

    Output frame k is the source frame nearest to time t0 + k / target_fps (the earlier one on a tie), as
    ffmpeg's fps filter picks by default. Picking by distance, not "the last frame at or before", keeps
    timestamps the container rounded (Matroska and WebM store whole milliseconds: 24 fps frames at 0, 42,
    83 ms against a grid of 0, 41.7, 83.3) from dropping and repeating frames. Variable-frame-rate clips
    resample by their real times; raising the rate repeats frames. The grid covers the clip up to half a
    frame past its last frame, whose duration is taken as the median frame interval.
    """
    n = len(timestamps)
    if target_fps is None or n <= 1:
        return list(range(n))
    if target_fps <= 0:
        raise ValueError(f"target_fps must be positive, got {target_fps}")
    t = np.asarray(timestamps, dtype=np.float64) - timestamps[0]
    end = t[-1] + float(np.median(np.diff(t))) / 2
    grid = np.arange(int(np.floor(end * target_fps + 1e-9)) + 1) / target_fps
    return np.searchsorted((t[:-1] + t[1:]) / 2, grid - _EPS, side="left").tolist()


def frame_windows(
    num_frames: int,
    target_frames: Sequence[int] | None,
    mode: str,
    stride: int | None = None,
    count: int | None = None,
    max_frames: int | None = None,
) -> list[list[int]]:
    """Windows of consecutive positions in a sequence of `num_frames` frames (e.g. the output of `resample`).

    Every target length that fits the clip (length <= num_frames) produces windows, like musubi-tuner:
      head:    one window per fitting length, from the first frame.
      chunk:   per fitting length f, the num_frames // f non-overlapping windows from the start.
      slide:   per fitting length f, a window starting every `stride` frames while it fits.
      uniform: per fitting length f, `count` windows with starts spread evenly over [0, num_frames - f]
               (fewer when the clip is too short for that many distinct starts).
      full:    one window of the largest 4k+1 <= min(num_frames, max_frames); target_frames is ignored.
    A clip shorter than every target length gives ONE window of the largest 4k+1 it holds (a still or a
    1-frame clip gives a 1-frame window) in every mode, so no clip ever yields zero windows silently.
    Length 1 (stills) does not count as a fit when other lengths are asked for: a clip that only fits 1
    also gets its largest 4k+1 window, so short clips keep their motion.
    Windows come ordered by length, then start.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "full":
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        return [list(range(longest_valid(min(num_frames, max_frames or num_frames))))]
    targets = check_target_frames(target_frames or [])
    if mode == "slide" and (stride is None or stride < 1):
        raise ValueError(f"slide mode needs stride >= 1, got {stride}")
    if mode == "uniform" and (count is None or count < 1):
        raise ValueError(f"uniform mode needs count >= 1, got {count}")
    fitting = [f for f in targets if f <= num_frames]
    # Shorter than every length asked for (stills aside): the longest window it has, so its motion is kept.
    short = not fitting or (fitting == [1] and targets != [1])
    windows = []
    for f in fitting:
        if mode == "head":
            starts = [0]
        elif mode == "chunk":
            starts = range(0, num_frames // f * f, f)
        elif mode == "slide":
            starts = range(0, num_frames - f + 1, stride)
        else:  # uniform
            starts = dict.fromkeys(np.linspace(0, num_frames - f, count).round().astype(int).tolist())
        windows += [list(range(s, s + f)) for s in starts]
    if short and longest_valid(num_frames) not in fitting:
        windows.append(list(range(longest_valid(num_frames))))
    return windows
