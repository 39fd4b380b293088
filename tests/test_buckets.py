import math
import warnings

import numpy as np
import pytest

from data.buckets import bucket_sizes, choose_bucket, resize_crop
from data.synth import pattern_frames


@pytest.mark.parametrize("resolution", [256, 480, 720, (832, 480), (1280, 720)])
def test_bucket_sizes(resolution):
    budget = resolution**2 if isinstance(resolution, int) else resolution[0] * resolution[1]
    buckets = bucket_sizes(resolution)
    assert len(buckets) == len(set(buckets))
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.85 * budget <= w * h <= budget
        assert max(w, h) / min(w, h) <= 2.0
        assert (h, w) in buckets  # portrait mirror of every landscape bucket
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert ((resolution, resolution) if isinstance(resolution, int) else resolution) in buckets


def test_bucket_options():
    assert bucket_sizes(256) == [
        (192, 336),
        (208, 304),
        (224, 288),
        (240, 272),
        (256, 256),
        (272, 240),
        (288, 224),
        (304, 208),
        (336, 192),
    ]
    assert all(min(b) >= 240 for b in bucket_sizes(256, min_side=240))
    assert bucket_sizes(256, max_ratio=1.0) == [(256, 256)]
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in bucket_sizes(512, step=32))
    with pytest.raises(ValueError):
        bucket_sizes(8)


def test_choose_bucket_by_aspect_ratio():
    buckets = bucket_sizes(480)
    assert choose_bucket(1920, 1080, buckets) == (640, 352)  # 16:9 landscape
    assert choose_bucket(1080, 1920, buckets) == (352, 640)  # 9:16 portrait
    assert choose_bucket(500, 500, buckets) == (480, 480)
    assert choose_bucket(4000, 500, buckets) == max(buckets, key=lambda b: b[0] / b[1])  # clamps to widest
    # log-ratio: the choice is symmetric between portrait and landscape
    for w, h in [(1280, 720), (1000, 700), (720, 480)]:
        bw, bh = choose_bucket(w, h, buckets)
        assert choose_bucket(h, w, buckets) == (bh, bw)
        assert abs(math.log(bw / bh) - math.log(w / h)) <= min(
            abs(math.log(x / y) - math.log(w / h)) for x, y in buckets
        )


def test_resize_crop_shapes_and_centre():
    frames = pattern_frames(3, 160, 90, seed=0)
    out = resize_crop(frames, (64, 48))
    assert out.shape == (3, 48, 64, 3) and out.dtype == np.uint8
    # 160x90 -> cover 64x48: scale to 85x48, crop 10 px each side: compare with a centre crop of the source
    centre = frames[:, :, 19:141]  # 122 px wide, ratio 4:3 of the 90 px height
    ref = resize_crop(centre, (64, 48))
    assert np.abs(out.astype(int) - ref).mean() < 4
    assert resize_crop(frames, (160, 90)).tobytes() == frames.tobytes()  # same size: unchanged
    assert resize_crop(frames[:1], (320, 176)).shape == (1, 176, 320, 3)  # upscale too


def test_resize_crop_antialiases():
    # A one-pixel checkerboard must average to grey when shrunk, not alias into stripes.
    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    frames = np.repeat(board[None, ..., None], 3, axis=3)
    out = resize_crop(frames, (32, 32)).astype(int)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3


def test_resize_crop_takes_read_only_frames_without_a_warning():
    """np.asarray of a PIL image is read-only; torch.from_numpy used to warn "not writable" on it."""
    frames = pattern_frames(2, 64, 48, seed=1)
    locked = frames.copy()
    locked.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = resize_crop(locked, (32, 32))
        same = resize_crop(locked, (64, 48))
    assert np.array_equal(out, resize_crop(frames, (32, 32))) and np.array_equal(same, frames)
    assert out.flags.writeable and same.flags.writeable  # callers hand it to torch.from_numpy too


def test_resize_crop_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_crop(np.zeros((2, 8, 8), np.uint8), (16, 16))
