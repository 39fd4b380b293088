"""Synthetic media for demos, tests and benchmarks: moving patterns, audio, and broken files.

No system ffmpeg is assumed anywhere in vidlora, so clips are encoded with `media.write_video` (the encoders
PyAV's wheel bundles) and audio with its aac/mp3/opus encoders. The broken-file helpers exist because a real
dataset always contains a few, and each must produce a clear report rather than kill a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from data import media

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


def add_tone_track(path: str | Path, codec: str | None = None) -> Path:
    """Give a video file a tone track (remuxed in place, video untouched), which readers must ignore."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.remux{path.suffix}")
    with av.open(str(path)) as source, av.open(str(tmp), "w") as out:
        video = source.streams.video[0]
        copy = out.add_stream_from_template(video)
        audio = _audio_stream(out, path, codec)  # every stream exists before the first packet is muxed
        last = 0.0
        for packet in source.demux(video):
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            packet.stream = copy
            out.mux(packet)
        _encode_tone(out, audio, max(last, 0.1))
    os.replace(tmp, path)
    return path


def write_hdr_video(path: str | Path, frames: np.ndarray, transfer: str = "pq", fps: float = 16) -> Path:
    """SDR `frames` (uint8 [F,H,W,3], BT.709) graded into HDR the way cameras store it: BT.2020 primaries,
    PQ or HLG (or "sdr": wide-gamut SDR, gamma 2.4), 10-bit HEVC with the colour tags on the stream.

    The exact inverse of what `media` does to decode it below the tone curve's knee.
    """
    white = media.SDR_WHITE_NITS
    light = (np.asarray(frames, np.float64) / 255) ** 2.4 @ np.linalg.inv(media.BT2020_TO_BT709).T
    light = np.maximum(light, 0)
    if transfer == "pq":  # inverse SMPTE ST 2084 EOTF
        m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 32, 3424 / 4096, 2413 / 128, 2392 / 128
        y = (light * white / 10000) ** m1
        code, trc = ((c1 + c2 * y) / (1 + c3 * y)) ** m2, ColorTrc.SMPTE2084
    elif transfer == "hlg":  # inverse BT.2100 display transform, then the HLG OETF
        luma = light @ media.BT2020_LUMA.astype(np.float64)
        scene_luma = (luma * white / media.HLG_PEAK_NITS) ** (1 / 1.2)
        e = light * white / media.HLG_PEAK_NITS / np.maximum(scene_luma, 1e-12)[..., None] ** 0.2
        a, b, c = 0.17883277, 0.28466892, 0.55991073
        code = np.where(e <= 1 / 12, np.sqrt(3 * e), a * np.log(np.maximum(12 * e - b, 1e-12)) + c)
        trc = ColorTrc.ARIB_STD_B67
    else:
        code, trc = light ** (1 / 2.4), ColorTrc.BT2020_10
    rgb16 = (np.clip(code, 0, 1) * 65535 + 0.5).astype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx265", rate=fps, options={"x265-params": "log-level=error", "crf": "8"})
        stream.width, stream.height, stream.pix_fmt = rgb16.shape[2], rgb16.shape[1], "yuv420p10le"
        tags = stream.codec_context
        tags.color_primaries, tags.color_trc, tags.colorspace = ColorPrimaries.BT2020, trc, 9  # 9: BT.2020 NCL
        tags.color_range = ColorRange.MPEG
        for i, image in enumerate(rgb16):
            frame = av.VideoFrame.from_ndarray(image, format="rgb48le")
            frame = frame.reformat(format="yuv420p10le", dst_colorspace=Colorspace.BT2020, dst_color_range="MPEG")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
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
        path = media.write_video(
            out_dir / f"clip_{i:03d}{suffix}", pattern_frames(f, w, h, seed + i), fps=fps, codec=codec
        )
        path.with_suffix(".txt").write_text(pattern_caption(seed + i) + "\n", encoding="utf-8")
        paths.append(path)
    still = media.write_image(out_dir / "still_000.png", pattern_frames(1, 128, 128, seed + n)[0])
    still.with_suffix(".txt").write_text(pattern_caption(seed + n) + "\n", encoding="utf-8")
    return [*paths, still]
