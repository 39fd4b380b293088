"""Real media files made with PyAV alone, for demos, tests and benchmarks.

No system ffmpeg is assumed anywhere in vidlora, so test clips are encoded with the encoders that PyAV's
wheel bundles (libx264, libx265, libvpx-vp9, libsvtav1, mjpeg, prores, mpeg4; aac/mp3/opus for audio).
The broken-file helpers exist because a real dataset always contains a few, and each must produce a clear
report rather than kill a run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# Friendly names -> PyAV encoder names.
CODEC_ALIASES = {"h264": "libx264", "hevc": "libx265", "h265": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
# A pixel format each encoder accepts, used when the caller gives none.
DEFAULT_PIX_FMT = {
    "libx264": "yuv420p",
    "libx265": "yuv420p",
    "libvpx-vp9": "yuv420p",
    "libsvtav1": "yuv420p",
    "mjpeg": "yuvj420p",
    "prores": "yuv422p10le",
    "prores_ks": "yuv422p10le",
    "mpeg4": "yuv420p",
}
# (name, rgb) pairs so a caption can say what a clip shows.
PALETTE = [
    ("red", (220, 40, 40)),
    ("orange", (240, 140, 30)),
    ("yellow", (235, 215, 50)),
    ("green", (40, 170, 70)),
    ("teal", (30, 160, 160)),
    ("blue", (40, 80, 220)),
    ("purple", (140, 60, 190)),
    ("pink", (235, 120, 180)),
    ("white", (245, 245, 245)),
    ("black", (20, 20, 20)),
]


def _pattern(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    names = rng.choice(len(PALETTE), size=4, replace=False)
    return {
        "bg": [PALETTE[i] for i in names[:2]],
        "circle": PALETTE[names[2]],
        "square": PALETTE[names[3]],
        "angle": rng.uniform(0, 2 * np.pi),
        "start": rng.uniform(0.15, 0.85, size=(2, 2)),  # (shape, xy) in [0, 1]
        "velocity": rng.uniform(-0.8, 0.8, size=(2, 2)),  # screen fractions over the clip
        "size": rng.uniform(0.12, 0.22, size=2),  # fraction of the shorter side
    }


def pattern_caption(seed: int = 0) -> str:
    """A caption that matches `pattern_frames(..., seed)`, so a demo LoRA learns text-to-content pairs."""
    p = _pattern(seed)

    def a(word: str) -> str:
        return f"an {word}" if word[0] in "aeiou" else f"a {word}"

    return f"{a(p['circle'][0])} circle and {a(p['square'][0])} square drifting over {a(p['bg'][0][0])} to {p['bg'][1][0]} gradient"


def pattern_frames(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth moving pattern, uint8 [F, H, W, 3] RGB: a drifting gradient plus a soft circle and square.

    Smooth so that lossy codecs keep it recognisable and a VAE/LoRA has something learnable; every frame
    differs from the last so frame-index bugs show; different seeds give different colours and motion.
    """
    p = _pattern(seed)
    ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    c0, c1 = (np.array(c[1], np.float32) for c in p["bg"])
    short = min(width, height)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        t = f / max(num_frames - 1, 1)
        g = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(p["angle"]) + ys * np.sin(p["angle"]) + 0.5 * t))
        img = c0 + (c1 - c0) * g[..., None]
        for k, (_, rgb) in enumerate((p["circle"], p["square"])):
            # Bounce inside the frame: a triangle wave of the linear path.
            cx, cy = np.abs(((p["start"][k] + p["velocity"][k] * t) % 2.0) - 1.0) * 0.7 + 0.15
            r = p["size"][k] * short
            dx, dy = (xs - cx) * width, (ys - cy) * height
            dist = np.hypot(dx, dy) if k == 0 else np.maximum(np.abs(dx), np.abs(dy))
            alpha = np.clip(r - dist + 0.5, 0.0, 1.0)[..., None]  # one-pixel soft edge
            img = img * (1 - alpha) + np.array(rgb, np.float32) * alpha
        out[f] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out


def _encoder(codec: str) -> str:
    return CODEC_ALIASES.get(codec, codec)


def _audio_stream(container: av.container.OutputContainer, path: Path, codec: str | None) -> av.AudioStream:
    # Streams must all exist before the first packet is muxed (the header is written then).
    if codec is None:
        codec = "libopus" if path.suffix.lower() in (".webm", ".ogg", ".opus") else "aac"
    stream = container.add_stream(codec, rate=48000)
    stream.layout = "mono"
    return stream


def _encode_tone(container: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    """Encode a quiet 440 Hz tone into `stream`."""
    rate = stream.rate
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, len(samples), 1024):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction = 16,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    rotation: int = 0,
    timestamps: Sequence[float] | None = None,
    audio: str | bool | None = None,
    container_options: dict[str, str] | None = None,
    **options: str,
) -> Path:
    """Encode `frames` (uint8 [F,H,W,3] RGB, or [F,H,W] grey) into `path`; the container follows the suffix.

    rotation: degrees clockwise a player turns the stored frames for display (the phone / `rotate` tag
        convention), written as a real display matrix and checked by reading the file back: a container
        that cannot hold one (e.g. AVI) raises instead of silently writing an unrotated clip.
    timestamps: seconds of each frame, strictly increasing, for a variable-frame-rate clip.
    audio: True or an encoder name adds a tone track, which readers must ignore.
    container_options: muxer options, e.g. {"movflags": "faststart"} puts the mp4 index first.
    options: encoder options, e.g. g="12" for a keyframe every 12 frames.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise ValueError(f"frames must be uint8 [F,H,W,3] or [F,H,W], got {frames.dtype} {frames.shape}")
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    if timestamps is not None and (
        len(timestamps) != len(frames) or any(b <= a for a, b in zip(timestamps, timestamps[1:]))
    ):
        raise ValueError("timestamps must give one strictly increasing time per frame")
    encoder = _encoder(codec)
    pix_fmt = pix_fmt or DEFAULT_PIX_FMT.get(encoder, "yuv420p")
    if "420" in pix_fmt and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(f"{pix_fmt} needs even width and height, got {frames.shape[2]}x{frames.shape[1]}")
    if encoder == "libx265":
        options.setdefault("x265-params", "log-level=error")  # x265 otherwise prints a page per clip
    if encoder == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 reads this; 1 = errors only
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(100000)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(encoder, rate=rate, options=dict(options))
        audio_stream = _audio_stream(container, path, None if audio is True else audio) if audio else None
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        time_base = Fraction(1, 90000) if timestamps is not None else 1 / rate
        stream.codec_context.time_base = time_base
        if rotation % 360:
            stream.set_display_rotation(-(rotation % 360))  # PyAV counts counter-clockwise
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="gray" if frames.ndim == 3 else "rgb24")
            frame.pts = round(timestamps[i] / time_base) if timestamps is not None else i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            seconds = timestamps[-1] if timestamps is not None else len(frames) / float(rate)
            _encode_tone(container, audio_stream, max(seconds, 0.1))
    if rotation % 360:
        with av.open(str(path)) as container:
            written = (-next(container.decode(video=0)).rotation) % 360
        if written != rotation % 360:
            path.unlink()
            raise ValueError(f"{path.suffix} container did not keep rotation={rotation} (reads back {written})")
    return path


def write_image(path: str | Path, frame: np.ndarray, **save_options) -> Path:
    """Save one uint8 [H,W,3] (or [H,W] grey) frame; the format follows the suffix (png, jpg, webp, bmp, gif)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame)).save(path, **save_options)
    return path


def write_audio(path: str | Path, seconds: float = 1.0, codec: str | None = None) -> Path:
    """An audio-only file (m4a/mp4 aac, mp3, opus/ogg/webm): media, but nothing a video trainer can use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec is None and path.suffix.lower() == ".mp3":
        codec = "libmp3lame"
    with av.open(str(path), "w") as container:
        _encode_tone(container, _audio_stream(container, path, codec), seconds)
    return path


def write_empty(path: str | Path) -> Path:
    """A zero-byte file, as left by an interrupted copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_random_bytes(path: str | Path, size: int = 4096, seed: int = 0) -> Path:
    """Noise under a media extension: must be rejected by content, not trusted by name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_text(path: str | Path, text: str = "this is not a video\n") -> Path:
    """A text file, e.g. named `.mp4` by mistake."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def truncate_file(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a file to the first `keep` fraction of its bytes, like an interrupted download.

    An mp4 written with container_options={"movflags": "faststart"} keeps its index and stays partly
    decodable; without it the index (at the end) is lost and the file cannot be opened at all.
    """
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


SAMPLE_CLIPS = [  # (width, height, frames, suffix, codec): a mix of sizes, a portrait clip and a webm
    (160, 128, 33, ".mp4", "libx264"),
    (128, 96, 41, ".mp4", "libx264"),
    (96, 128, 49, ".mp4", "libx264"),
    (128, 96, 45, ".webm", "libvpx-vp9"),
]


def make_sample_clips(out_dir: str | Path, n: int = 4, fps: float = 16, seed: int = 0) -> list[Path]:
    """Write `n` small captioned clips (33-49 frames, 96..160 px, one portrait) plus one captioned still.

    Each media file gets a sidecar `<stem>.txt` caption that describes its pattern. Returns the media
    paths, still image last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h, f, suffix, codec = SAMPLE_CLIPS[i % len(SAMPLE_CLIPS)]
        path = write_video(out_dir / f"clip_{i:03d}{suffix}", pattern_frames(f, w, h, seed + i), fps=fps, codec=codec)
        path.with_suffix(".txt").write_text(pattern_caption(seed + i) + "\n", encoding="utf-8")
        paths.append(path)
    still = write_image(out_dir / "still_000.png", pattern_frames(1, 128, 128, seed + n)[0])
    still.with_suffix(".txt").write_text(pattern_caption(seed + n) + "\n", encoding="utf-8")
    return [*paths, still]
