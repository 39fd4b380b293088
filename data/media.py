"""Probe and decode videos and stills into displayed-orientation uint8 RGB frames.

Two decoders, because neither is enough alone (measured with decord 0.6 and PyAV 18): decord is a little
faster, but cannot open AV1 or truncated mp4s, and on some rotated clips (e.g. 64x48 at 90°) it returns a
garbled 4-channel array; PyAV reads everything its ffmpeg knows but leaves rotation to us. So `probe` counts the
frames that really decode, records which backend can read the file, and `read_frames` tries decord only
where it was checked, falling back to PyAV on any failure.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorTrc
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Formats Pillow decodes itself; anything else goes to PyAV, whose image2 demuxer reads more.
PIL_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "ICO", "TGA", "PPM", "AVIF", "HEIF"}
# EXIF orientation -> clockwise display rotation (the mirrored ones 2/4/5/7 keep their rotation part).
EXIF_ROTATION = {1: 0, 2: 0, 3: 180, 4: 180, 5: 270, 6: 90, 7: 90, 8: 270}
# Beyond this many frames ahead, seeking to the target's keyframe beats decoding through.
SEEK_AHEAD = 48
# HDR / wide-gamut video -> BT.709 SDR, in display light where 1.0 is SDR white (see `_to_sdr`).
HDR_TRANSFERS = {ColorTrc.SMPTE2084: "pq", ColorTrc.ARIB_STD_B67: "hlg"}
SDR_WHITE_NITS = 203.0  # BT.2408: HDR reference white, shown as SDR white
HLG_PEAK_NITS = 1000.0  # the nominal HLG display of BT.2100 (system gamma 1.2)
KNEE = 0.75  # tone curve: unchanged below this fraction of SDR white, a smooth shoulder above
BT2020_TO_BT709 = np.array(  # linear light, from the two sets of primaries (BT.2087)
    [[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083], [-0.0182, -0.1006, 1.1187]], np.float32
)
BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593], np.float32)


class MediaError(Exception):
    """A file that cannot be used, with the reason in words a user can act on."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NotVideoError(MediaError):
    """A readable file with no picture in it (audio only): not a broken video, so reports say skipped."""


@dataclass(frozen=True)
class MediaInfo:
    """What a clip really holds; JSON-friendly (`dataclasses.asdict`, `MediaInfo.from_dict`)."""

    path: str
    kind: str  # "video" or "image"
    width: int  # displayed width, after rotation
    height: int  # displayed height, after rotation
    num_frames: int  # frames that actually decode (1 for a still), never the container's estimate
    fps: float  # average frames per second over the clip; 0.0 for a still
    duration: float  # seconds, num_frames / fps; 0.0 for a still
    timestamps: tuple[float, ...]  # presentation time of every frame in display order, seconds as stored
    rotation: int  # degrees clockwise the stored frames are turned for display: 0, 90, 180 or 270
    codec: str  # e.g. "h264", "hevc", "vp9", "av1", "png"
    pix_fmt: str  # stored pixel format (ffmpeg name, or Pillow mode for stills)
    bit_depth: int  # bits per sample as stored; frames are always returned as 8-bit RGB
    backend: str  # decoder read_frames will use: "decord", "pyav" or "pillow"
    note: str = ""  # anything a user should hear about, e.g. a truncated tail; empty when clean
    transfer: str = ""  # "pq" or "hlg" for HDR video, tone-mapped to SDR when decoded; "" for SDR
    gamut: str = ""  # "bt2020" for wide-gamut video, converted to BT.709 when decoded; "" for BT.709 or untagged

    @classmethod
    def from_dict(cls, d: dict) -> MediaInfo:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**{**d, "timestamps": tuple(d["timestamps"])})


def probe(path: str | Path) -> MediaInfo:
    """Inspect a file and count its decodable frames; raises MediaError when it cannot be used.

    Cheap for clean files: the video stream is demuxed (no decoding) for the frame count and timestamps,
    and only the last group of pictures is decoded to prove the tail is intact. A damaged file is decoded
    in full so `num_frames` is exactly what `read_frames` can deliver.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    image = _open_image(path)
    if image is not None:
        with image:
            return _probe_image(path, image)
    return _probe_video(path)


def read_frames(media: MediaInfo | str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames `indices` (display order, repeats allowed) as uint8 [N, H, W, 3] RGB, displayed orientation.

    Each call opens the file once: pass every index a clip needs in one call rather than one per window.
    """
    info = media if isinstance(media, MediaInfo) else probe(media)
    wanted = [int(i) for i in indices]
    outside = [i for i in wanted if not 0 <= i < info.num_frames]
    if outside:
        raise IndexError(f"{info.path}: frames {outside[:5]} outside 0..{info.num_frames - 1}")
    if not wanted:
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    if info.kind == "image":
        with Image.open(info.path) as image:
            return np.repeat(_image_rgb(image)[None], len(wanted), axis=0)
    unique = sorted(set(wanted))
    frames = _read_decord(info, unique) if info.backend == "decord" else None
    if frames is None:
        frames = _read_pyav(info, unique)
    position = {index: k for k, index in enumerate(unique)}
    return frames[[position[i] for i in wanted]]


def read_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """An image file as an image-to-video model's first frame: upright (EXIF orientation applied, as training stills
    are read), resized and centre-cropped to `size` = (width, height) as training frames are; uint8 [H, W, 3].
    Anything else is one UserError naming the file."""
    from data.buckets import resize_crop
    from trainer.config import UserError

    path = Path(path)
    try:
        info = probe(path)
        if info.kind != "image":
            raise UserError(f"{path}: a {info.kind}, not an image (give its first frame as an image file)")
        return resize_crop(read_frames(info, [0]), size)[0]
    except MediaError as e:
        raise UserError(f"{path}: not a readable image ({e.reason})") from None


# ---------------------------------------------------------------------------------------------- stills


def _open_image(path: Path) -> Image.Image | None:
    try:
        image = Image.open(path)
    except Exception:  # Pillow raises many types for "not an image"
        return None
    if image.format not in PIL_FORMATS:
        image.close()
        return None
    return image


def _probe_image(path: Path, image: Image.Image) -> MediaInfo:
    try:
        image.load()  # headers open lazily; a truncated image fails only here
    except Exception as e:
        raise MediaError(path, f"{image.format} image does not decode ({e})") from e
    rotation = EXIF_ROTATION.get(image.getexif().get(0x0112, 1), 0)
    width, height = image.size
    if rotation in (90, 270):
        width, height = height, width
    frames = getattr(image, "n_frames", 1)
    return MediaInfo(
        path=str(path),
        kind="image",
        width=width,
        height=height,
        num_frames=1,
        fps=0.0,
        duration=0.0,
        timestamps=(0.0,),
        rotation=rotation,
        codec=image.format.lower(),
        pix_fmt=image.mode,
        bit_depth=16 if image.mode.startswith("I") else 8,
        backend="pillow",
        note=f"animated {image.format} with {frames} frames: only the first is used" if frames > 1 else "",
    )


def _image_rgb(image: Image.Image) -> np.ndarray:
    """Displayed (EXIF-oriented) 8-bit RGB; alpha is composited on white, 16-bit grey scaled down."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grey ("I" is 32-bit, as older Pillow opens 16-bit PNGs)
        grey = np.asarray(image).astype(np.int64)
        sixteen = image.mode.startswith("I;16") or grey.max() > 255
        grey = (grey >> 8 if sixteen else grey).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------- videos


def _video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """First real video stream; cover art in audio files is a 'video' stream too and is skipped."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _decode(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """Frames in display order, stopping cleanly at the first damage (truncated tail, corrupt data)."""
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                break
            for frame in stream.decode(packet):  # the final empty packet flushes the decoder
                if frame.is_corrupt:
                    return
                yield frame
            if packet.size == 0:
                return
        else:
            return
    except av.FFmpegError:
        pass
    try:  # stopped early: the decoder still holds complete frames waiting for reordering
        for frame in stream.codec_context.decode(None):
            if frame.is_corrupt:
                return
            yield frame
    except av.FFmpegError:
        pass


def _seconds(pts: int | None, time_base: Fraction) -> float | None:
    # Probe and read both use this formula, so equal pts give bit-equal floats to match frames by.
    return None if pts is None else float(pts * time_base)


def _open_video(path: str | Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except av.FFmpegError as e:
        raise MediaError(path, f"not a readable media file ({e.strerror or e})") from e


def _probe_video(path: Path) -> MediaInfo:
    with _open_video(path) as container:
        stream = _video_stream(container)
        if stream is None:
            if container.streams.audio:
                raise NotVideoError(path, "audio only, no video stream")
            raise MediaError(path, "no video stream")
        if stream.codec_context is None:
            raise MediaError(path, "no decoder for its video codec")
        codec, time_base, claimed = stream.codec_context.codec.canonical_name, stream.time_base, stream.frames
        # What the header promises, to flag files cut short: the stream's own duration, else the file's
        # (only when nothing else, such as a longer audio track, could account for it).
        if stream.duration:
            promised = float(stream.duration * time_base)
        else:
            promised = container.duration / 1e6 if container.duration and len(container.streams) == 1 else 0.0
        rate = stream.average_rate or stream.guessed_rate or 25
        pts, keyframes, damage = [], [], ""
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                if packet.is_corrupt:
                    damage = "corrupt packet"
                    break
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
        except av.FFmpegError as e:
            damage = f"demux error: {e.strerror or e}"
    packets = len(pts)
    first = None
    if not damage and pts and None not in pts and len(set(pts)) == len(pts) and None not in keyframes:
        # Clean index: decode only the last group of pictures and check it matches the demuxed packets.
        # The seek aims 2 s early because some demuxers (MPEG-TS) land after the time asked for.
        pts.sort()
        start = max(keyframes, default=pts[0])
        if start - round(2 / time_base) > pts[0]:
            first, tail = _decode_pts(path, seek=start - round(2 / time_base))
            if sorted(p for p in tail if p is not None and p >= start) != [p for p in pts if p >= start]:
                first = None
    if first is None:  # damaged, unindexed, a single group of pictures, or a tail that disagrees: decode all
        first, pts = _decode_pts(path)
        if None in pts or any(b <= a for a, b in zip(pts, pts[1:])):
            pts = [round(i / rate / time_base) for i in range(len(pts))]
            damage = damage or "missing or unordered timestamps, constant frame rate assumed"
        if len(pts) < packets:
            damage = damage or "decoder stopped early"
    if first is None:
        raise MediaError(path, f"no frame decodes: truncated or corrupt ({damage or 'empty video stream'})")
    rotation = round(-first.rotation / 90) % 4 * 90
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    timestamps = tuple(_seconds(p, time_base) for p in pts)
    n, span = len(timestamps), timestamps[-1] - timestamps[0]
    fps = (n - 1) / span if n > 1 and span > 0 else float(rate)
    transfer = HDR_TRANSFERS.get(first.color_trc, "")
    primaries = first.color_primaries  # PQ and HLG are BT.2100: BT.2020 primaries unless tagged otherwise
    wide = primaries == ColorPrimaries.BT2020 or (bool(transfer) and primaries == ColorPrimaries.UNSPECIFIED)
    plain = rotation == 0 and not transfer and not wide  # decord would neither rotate nor convert colours
    problems = [damage] if damage else []
    if n < max(packets, claimed):
        problems.append(f"only {n} of {max(packets, claimed)} frames decode (truncated or damaged file)")
    elif promised > (n + 2) / fps + 0.1:
        problems.append(f"only {n / fps:.2f} s of the {promised:.2f} s in its header decode (truncated file?)")
    return MediaInfo(
        path=str(path),
        kind="video",
        width=width,
        height=height,
        num_frames=n,
        fps=fps,
        duration=n / fps,
        timestamps=timestamps,
        rotation=rotation,
        codec=codec,
        pix_fmt=first.format.name,
        bit_depth=first.format.components[0].bits,
        backend="decord" if plain and _decord_reads(path, n, width, height) else "pyav",
        note="; ".join(problems),
        transfer=transfer,
        gamut="bt2020" if wide else "",
    )


def _decode_pts(path: Path, seek: int | None = None) -> tuple[av.VideoFrame | None, list[int | None]]:
    """First decoded frame and the pts of every frame that decodes, from the keyframe at/before `seek`."""
    first, pts = None, []
    with _open_video(path) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        if seek is not None:
            try:
                container.seek(seek, stream=stream, backward=True)
            except av.FFmpegError:  # unseekable (e.g. a raw .h264 stream): the caller decodes everything
                return None, []
        for frame in _decode(container, stream):
            first = first or frame
            pts.append(frame.pts)
    return first, pts


def _to_rgb(frame: av.VideoFrame, info: MediaInfo) -> np.ndarray:
    if info.transfer or info.gamut:
        rgb = _to_sdr(frame.to_ndarray(format="rgb48le"), info.transfer, info.gamut)
    else:
        rgb = frame.to_ndarray(format="rgb24")  # swscale handles grey, 10-bit, full/limited range
    return np.ascontiguousarray(np.rot90(rgb, k=-info.rotation // 90)) if info.rotation else rgb


def _to_sdr(rgb: np.ndarray, transfer: str, gamut: str) -> np.ndarray:
    """16-bit R'G'B' of an HDR (PQ, HLG) or BT.2020 frame -> 8-bit BT.709 SDR, as a grading tool would show it.

    In display light with SDR white = 1.0: PQ is absolute, and its 203 nits (BT.2408's reference white) become
    SDR white; HLG goes through the BT.2100 display transform for a 1000-nit display, which puts its
    reference white there too; SDR BT.2020 is gamma 2.4. Then BT.2020 -> BT.709 primaries (colours outside
    BT.709 clip), and highlights are compressed per pixel, on the largest channel so hues keep: unchanged
    below KNEE, then KNEE + (1 - KNEE) e / (e + 1 - KNEE) with e = x - KNEE (Reinhard on the excess: slope 1
    at the knee, SDR white only at infinity, so 400 and 1000 nits stay apart). Finally gamma 1/2.4 (BT.1886).
    Several times slower than an SDR decode (numpy, per pixel).
    """
    x = _linear_lut(transfer)[rgb]
    if transfer == "hlg":  # scene light -> display light: Lw * Ys^(gamma - 1) * E, gamma 1.2
        x *= (HLG_PEAK_NITS / SDR_WHITE_NITS) * (x @ BT2020_LUMA)[..., None] ** 0.2
    if gamut == "bt2020":
        x = x @ BT2020_TO_BT709.T
    np.maximum(x, 0, out=x)
    peak = np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])
    excess = np.maximum(peak - KNEE, 0)
    shoulder = KNEE + (1 - KNEE) * excess / (excess + 1 - KNEE)
    x *= np.divide(shoulder, peak, out=np.ones_like(peak), where=peak > KNEE)[..., None]
    return (np.power(x, 1 / 2.4) * 255 + 0.5).astype(np.uint8)


@functools.cache
def _linear_lut(transfer: str) -> np.ndarray:
    """16-bit code value -> linear light (SDR white = 1.0; HLG: scene light, 1.0 = peak)."""
    v = np.arange(65536, dtype=np.float64) / 65535
    if transfer == "pq":  # SMPTE ST 2084 EOTF, in nits
        m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 32, 3424 / 4096, 2413 / 128, 2392 / 128
        p = v ** (1 / m2)
        x = 10000 * (np.maximum(p - c1, 0) / (c2 - c3 * p)) ** (1 / m1) / SDR_WHITE_NITS
    elif transfer == "hlg":  # ARIB STD-B67 inverse OETF
        a, b, c = 0.17883277, 0.28466892, 0.55991073
        x = np.where(v <= 0.5, v * v / 3, (np.exp((v - c) / a) + b) / 12)
    else:
        x = v**2.4
    return x.astype(np.float32)


def _read_pyav(info: MediaInfo, unique: list[int]) -> np.ndarray:
    """Decode the sorted `unique` indices, seeking across long gaps, counting from the start as a last resort."""
    by_time = {t: i for i, t in enumerate(info.timestamps)}
    wanted, got = set(unique), {}

    def collect(frames: Iterator[tuple[int, av.VideoFrame]], target: int) -> tuple[int, int]:
        """Take wanted frames up to `target`; returns the first and last index seen (-1 if none)."""
        first = index = -1
        for index, frame in frames:
            first = index if first < 0 else first
            if index in wanted:
                got[index] = _to_rgb(frame, info)
            if index >= target:
                break
        return first, index

    with _open_video(info.path) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        frames, position = None, -1
        for target in unique:
            if target in got:
                continue
            if frames is None or target - position > SEEK_AHEAD:
                # Some demuxers (MPEG-TS) land after the requested time: step further back until it is covered.
                for back in (0.0, 2.0, 10.0, 60.0):
                    frames = _frames_from(container, stream, info.timestamps[target] - back, by_time)
                    first, position = collect(frames, target)
                    if 0 <= first <= target:
                        break
            else:
                position = collect(frames, target)[1]
            if target not in got:
                break  # a timestamp did not match
    missing = sorted(wanted - got.keys())
    if missing:  # count frames from the start, exactly as probe did when it decoded everything
        with _open_video(info.path) as container:
            stream = _video_stream(container)
            stream.thread_type = "AUTO"
            collect(enumerate(_decode(container, stream)), missing[-1])
        missing = sorted(wanted - got.keys())
    if missing:
        raise MediaError(info.path, f"frames {missing[:5]} did not decode (file changed since probe?)")
    return np.stack([got[i] for i in unique])


def _frames_from(
    container: av.container.InputContainer, stream: av.VideoStream, seconds: float, by_time: dict[float, int]
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) pairs from the keyframe at or before `seconds`, indexed by their timestamps."""
    try:
        container.seek(max(0, round(Fraction(seconds) / stream.time_base)), stream=stream, backward=True)
    except av.FFmpegError:  # unseekable stream: the caller falls back to counting from the start
        return
    for frame in _decode(container, stream):
        index = by_time.get(_seconds(frame.pts, stream.time_base))
        if index is None:
            return
        yield index, frame


# ---------------------------------------------------------------------------------------------- decord


def _import_decord() -> ModuleType | None:
    """decord is optional (no wheels for ARM); imported lazily so PyAV-only installs work."""
    try:
        import decord
    except ImportError:
        return None
    return decord


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """decord's bundled ffmpeg logs straight to file descriptor 2; its exceptions carry the reason anyway.

    Not thread-safe: another thread's stderr output is lost while this is active.
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _decord_reads(path: Path, num_frames: int, width: int, height: int) -> bool:
    """decord opens the file, agrees on the frame count and returns a well-formed first frame."""
    decord = _import_decord()
    if decord is None:
        return False
    try:
        with _quiet_stderr():
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
            return len(reader) == num_frames and tuple(reader[0].shape) == (height, width, 3)
    except Exception:
        return False


def _read_decord(info: MediaInfo, unique: list[int]) -> np.ndarray | None:
    """decord's batch for `unique`, or None when it fails or returns a malformed array."""
    decord = _import_decord()
    if decord is None:
        return None
    try:
        with _quiet_stderr():
            reader = decord.VideoReader(info.path, ctx=decord.cpu(0))
            batch = reader.get_batch(unique)
        frames = np.asarray(batch.asnumpy() if hasattr(batch, "asnumpy") else batch)  # any decord bridge
    except Exception as e:
        log.warning("decord failed on %s (%s); decoding with PyAV", info.path, e)
        return None
    if frames.shape != (len(unique), info.height, info.width, 3) or frames.dtype != np.uint8:
        log.warning("decord returned %s %s for %s; decoding with PyAV", frames.dtype, frames.shape, info.path)
        return None
    return frames


# ---------------------------------------------------------------------------------------------- writing

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


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction = 16,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    rotation: int = 0,
    timestamps: Sequence[float] | None = None,
    container_options: dict[str, str] | None = None,
    **options: str,
) -> Path:
    """Encode `frames` (uint8 [F,H,W,3] RGB, or [F,H,W] grey) into `path`; the container follows the suffix.

    rotation: degrees clockwise a player turns the stored frames for display (the phone / `rotate` tag
        convention), written as a real display matrix and checked by reading the file back: a container
        that cannot hold one (e.g. AVI) raises instead of silently writing an unrotated clip.
    timestamps: seconds of each frame, strictly increasing, for a variable-frame-rate clip.
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
    encoder = CODEC_ALIASES.get(codec, codec)
    pix_fmt = pix_fmt or DEFAULT_PIX_FMT.get(encoder, "yuv420p")
    if "420" in pix_fmt and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(f"{pix_fmt} needs even width and height, got {frames.shape[2]}x{frames.shape[1]}")
    if encoder == "libx265":
        options.setdefault("x265-params", "log-level=error")  # x265 otherwise prints a page per clip
    if encoder == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 reads this; 1 = errors only
    path.parent.mkdir(parents=True, exist_ok=True)
    # Encoded beside `path` under a hidden name with the same suffix (the container follows it), then renamed: a
    # crash or a kill mid-encode leaves no truncated video under the real name.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        _encode(tmp, frames, fps, encoder, pix_fmt, rotation, timestamps, container_options, options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _encode(
    path: Path,
    frames: np.ndarray,
    fps: float | Fraction,
    encoder: str,
    pix_fmt: str,
    rotation: int,
    timestamps: Sequence[float] | None,
    container_options: dict[str, str] | None,
    options: dict[str, str],
) -> None:
    rate = Fraction(fps).limit_denominator(100000)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(encoder, rate=rate, options=dict(options))
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
    if rotation % 360:
        with av.open(str(path)) as container:
            written = (-next(container.decode(video=0)).rotation) % 360
        if written != rotation % 360:
            path.unlink()
            raise ValueError(f"{path.suffix} container did not keep rotation={rotation} (reads back {written})")


def write_image(path: str | Path, frame: np.ndarray, **save_options) -> Path:
    """Save one uint8 [H,W,3] (or [H,W] grey) frame; the format follows the suffix (png, jpg, webp, bmp, gif)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame)).save(path, **save_options)
    return path
