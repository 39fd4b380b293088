"""probe / read_frames on real files made by data.synth: every codec PyAV can write, rotation, VFR,
stills, grey, audio tracks and each kind of broken file. No decoder is mocked."""

import dataclasses
import inspect
import json
import subprocess
import sys

import av
import numpy as np
import pytest
from av.video.reformatter import ColorPrimaries, ColorTrc
from PIL import Image

from data import inspect as data_inspect
from data import media, synth
from data.media import MediaError, MediaInfo, probe, read_frames
from data.windows import resample
from tests.conftest import ROOT, cli_env

W, H, N = 64, 48, 9
HAS_DECORD = media._import_decord() is not None
VFR_TIMES = [0.0, 0.05, 0.1, 0.3, 0.35, 0.6, 0.62, 0.9, 1.0, 1.5]

CODECS = {  # name: (file name, codec, pix_fmt, canonical codec, bit depth, decord expected to read it)
    "h264": ("h264.mp4", "h264", None, "h264", 8, True),
    "hevc10": ("hevc10.mp4", "hevc", "yuv420p10le", "hevc", 10, True),
    "vp9": ("vp9.webm", "vp9", None, "vp9", 8, True),
    "av1": ("av1.mp4", "av1", None, "av1", 8, False),  # decord: "cannot find video stream"
    "mjpeg_avi": ("mjpeg.avi", "mjpeg", None, "mjpeg", 8, True),
    "mjpeg_mkv": ("mjpeg.mkv", "mjpeg", None, "mjpeg", 8, True),
    "prores": ("prores.mov", "prores", None, "prores", 10, True),
    "mpeg4": ("mpeg4.mp4", "mpeg4", None, "mpeg4", 8, True),
}


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Every test file, written once: name -> path."""
    d = tmp_path_factory.mktemp("media")
    f = synth.pattern_frames(N, W, H, seed=1)
    out = {}
    for name, (file, codec, pix_fmt, *_) in CODECS.items():
        out[name] = media.write_video(d / file, f, codec=codec, pix_fmt=pix_fmt)
    out["rot90"] = media.write_video(d / "rot90.mp4", f, rotation=90)
    out["rot180"] = media.write_video(d / "rot180.mp4", f, rotation=180)
    out["rot270"] = media.write_video(d / "rot270.mkv", f, rotation=270)
    out["portrait"] = media.write_video(d / "portrait.mp4", synth.pattern_frames(N, H, W, seed=2))
    out["vfr"] = media.write_video(d / "vfr.mkv", synth.pattern_frames(10, W, H, seed=3), timestamps=VFR_TIMES)
    out["long"] = media.write_video(d / "long.mp4", synth.pattern_frames(300, W, H, seed=4), g="24")
    out["raw_h264"] = media.write_video(d / "raw.h264", f)  # no container: no timestamps, cannot seek
    out["one"] = media.write_video(d / "one.mp4", f[:1])
    out["five"] = media.write_video(d / "five.mp4", f[:5])
    out["grey"] = media.write_video(d / "grey.mp4", f[..., 1], codec="hevc", pix_fmt="gray")
    out["audio_track"] = synth.add_tone_track(media.write_video(d / "with audio.mp4", f))
    out["audio_track_webm"] = synth.add_tone_track(media.write_video(d / "with_audio.webm", f, codec="vp9"))
    for ext in ("png", "jpg", "webp", "bmp", "gif"):
        out[ext] = media.write_image(d / f"still.{ext}", f[0])
    out["grey_png"] = media.write_image(d / "grey.png", f[0, ..., 0])
    out["grey16_png"] = d / "grey16.png"
    Image.fromarray(f[0, ..., 0].astype(np.uint16) * 257).save(out["grey16_png"])
    rgba = np.dstack([f[0], np.where(np.arange(W) < W // 2, 255, 0).astype(np.uint8)[None].repeat(H, 0)])
    out["rgba_png"] = media.write_image(d / "rgba.png", rgba)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    out["exif_jpg"] = media.write_image(d / "exif.jpg", f[0], exif=exif, quality=95)
    # Broken files.
    out["empty"] = synth.write_empty(d / "empty.mp4")
    out["random"] = synth.write_random_bytes(d / "random.mp4")
    out["text"] = synth.write_text(d / "text.mp4")
    out["audio_m4a"] = synth.write_audio(d / "audio.m4a")
    out["audio_mp4"] = synth.write_audio(d / "audio_only.mp4")
    out["audio_mp3"] = synth.write_audio(d / "audio.mp3")
    long = synth.pattern_frames(60, W, H, seed=5)
    out["trunc_noindex"] = synth.truncate_file(media.write_video(d / "trunc_noindex.mp4", long))
    out["trunc_full"] = media.write_video(d / "trunc_full.mp4", long, container_options={"movflags": "faststart"})
    out["trunc_faststart"] = synth.truncate_file(
        media.write_video(d / "trunc_faststart.mp4", long, codec="mjpeg", container_options={"movflags": "faststart"})
    )
    out["trunc_mkv"] = synth.truncate_file(media.write_video(d / "trunc.mkv", long))
    out["frames"] = f
    return out


@pytest.mark.parametrize("name", list(CODECS))
def test_codecs_probe_and_read(clips, name):
    _, _, _, codec, depth, decord_ok = CODECS[name]
    info = probe(clips[name])
    assert (info.kind, info.width, info.height, info.num_frames) == ("video", W, H, N)
    assert (info.codec, info.bit_depth, info.rotation, info.note) == (codec, depth, 0, "")
    assert info.fps == pytest.approx(16, abs=0.05) and len(info.timestamps) == N
    assert info.backend == ("decord" if decord_ok and HAS_DECORD else "pyav")
    frames = read_frames(info, range(N))
    assert frames.shape == (N, H, W, 3) and frames.dtype == np.uint8
    assert mean_diff(frames, clips["frames"]) < 12


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("name", ["h264", "vp9", "mjpeg_avi", "prores", "hevc10", "vfr", "trunc_mkv"])
def test_decord_and_pyav_agree(clips, name):
    info = probe(clips[name])
    assert info.backend == "decord"
    n = info.num_frames
    via_pyav = read_frames(dataclasses.replace(info, backend="pyav"), range(n))
    # 10-bit to 8-bit conversion differs slightly between the two bundled ffmpegs.
    assert mean_diff(read_frames(info, range(n)), via_pyav) < (3 if name == "hevc10" else 0.01)


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("name", ["rot90", "av1", "trunc_faststart"])
def test_decord_failures_fall_back_to_pyav(clips, name, capfd, caplog):
    # Real decord quirks: a garbled 4-channel array for a 64x48 clip rotated 90 degrees, "cannot find
    # video stream" for AV1, no index for a truncated mp4. Forcing decord must still give the right frames.
    info = probe(clips[name])
    assert info.backend == "pyav"
    n = info.num_frames
    forced = read_frames(dataclasses.replace(info, backend="decord"), range(n))
    assert np.array_equal(forced, read_frames(info, range(n)))
    assert "decoding with PyAV" in caplog.text
    assert capfd.readouterr().err == ""  # decord's ffmpeg log lines are kept off the terminal


def test_without_decord_everything_reads(clips, monkeypatch):
    monkeypatch.setattr(media, "_import_decord", lambda: None)
    info = probe(clips["h264"])
    assert info.backend == "pyav"
    assert read_frames(info, [8, 0]).shape == (2, H, W, 3)


@pytest.mark.parametrize(("name", "degrees"), [("rot90", 90), ("rot180", 180), ("rot270", 270)])
def test_rotation_is_applied(clips, name, degrees):
    info = probe(clips[name])
    assert info.rotation == degrees
    assert (info.width, info.height) == ((H, W) if degrees % 180 else (W, H))
    frames = read_frames(info, range(N))
    right = np.rot90(clips["frames"], k=-degrees // 90, axes=(1, 2))  # clockwise
    wrong = np.rot90(clips["frames"], k=degrees // 90, axes=(1, 2))
    assert mean_diff(frames, right) < 8
    if degrees != 180:
        assert mean_diff(frames, wrong) > 3 * mean_diff(frames, right)


def test_portrait_clip(clips):
    info = probe(clips["portrait"])
    assert (info.width, info.height, info.rotation) == (H, W, 0)
    assert read_frames(info, [0]).shape == (1, W, H, 3)


def test_vfr_timestamps_and_resample(clips):
    info = probe(clips["vfr"])
    assert info.num_frames == 10
    assert np.allclose(info.timestamps, VFR_TIMES, atol=1e-3)
    assert info.fps == pytest.approx(9 / 1.5)
    # At 10 fps, output frame k is the source frame nearest to k/10 s (the earlier one on a tie).
    picks = resample(info.timestamps, 10)
    assert picks[:12] == [0, 2, 2, 3, 4, 5, 5, 6, 7, 7, 8, 8]
    full = read_frames(info, range(10))
    assert np.array_equal(read_frames(info, picks), full[picks])


@pytest.fixture(scope="module")
def hdr_clips(tmp_path_factory):
    """The SDR pattern graded into PQ, HLG and wide-gamut SDR, all BT.2020 10-bit HEVC: transfer -> path."""
    d = tmp_path_factory.mktemp("hdr")
    sdr = synth.pattern_frames(5, W, H, seed=6)
    return sdr, {t: synth.write_hdr_video(d / f"{t}.mp4", sdr, transfer=t) for t in ("pq", "hlg", "sdr")}


@pytest.mark.parametrize(
    ("transfer", "trc"), [("pq", ColorTrc.SMPTE2084), ("hlg", ColorTrc.ARIB_STD_B67), ("sdr", ColorTrc.BT2020_10)]
)
def test_hdr_and_wide_gamut_are_detected_and_converted_to_sdr(hdr_clips, transfer, trc):
    sdr, paths = hdr_clips
    with av.open(str(paths[transfer])) as container:  # what the encoder really wrote
        tags = container.streams.video[0].codec_context
        assert (tags.color_trc, tags.color_primaries, tags.colorspace) == (trc, ColorPrimaries.BT2020, 9)
    info = probe(paths[transfer])
    assert (info.transfer, info.gamut, info.bit_depth) == ("" if transfer == "sdr" else transfer, "bt2020", 10)
    assert info.backend == "pyav"  # decord would convert as if it were BT.709 SDR
    frames = read_frames(info, range(5))
    # What an HDR-unaware decode shows: flat and desaturated (PQ) or washed out (HLG, BT.2020 as BT.709).
    naive = read_frames(dataclasses.replace(info, transfer="", gamut=""), range(5))
    assert mean_diff(frames, sdr) < 5 and mean_diff(naive, sdr) > 3 * mean_diff(frames, sdr)


def test_hdr_highlights_roll_off_instead_of_clipping():
    """PQ greys at 100, 203 (reference white), 400 and 1000 nits stay distinct and below full white."""
    pq = {100: 0.5081, 203: 0.5807, 400: 0.6526, 1000: 0.7518}  # ST 2084 code values of those nits
    grey = np.array([[[round(v * 65535)] * 3 for v in pq.values()]], np.uint16)
    levels = media._to_sdr(grey, "pq", "bt2020")[0, :, 0].tolist()
    assert levels == sorted(set(levels)) and levels[-1] < 255
    assert levels[0] == pytest.approx(255 * (100 / 203) ** (1 / 2.4), abs=1)  # below the knee: unchanged


def test_long_clip_seeking_matches_sequential(clips):
    info = probe(clips["long"])
    assert info.num_frames == 300 and info.duration == pytest.approx(300 / 16)
    pyav = dataclasses.replace(info, backend="pyav")
    full = read_frames(pyav, range(300))
    picks = [250, 3, 120, 121, 299, 0, 60, 200, 23, 24, 25, 47, 48]
    assert np.array_equal(read_frames(pyav, picks), full[picks])
    assert mean_diff(read_frames(info, picks), full[picks]) < 0.01


def test_raw_stream_without_timestamps(clips):
    info = probe(clips["raw_h264"])
    assert info.num_frames == N and "constant frame rate assumed" in info.note
    assert mean_diff(read_frames(info, [8, 0]), clips["frames"][[8, 0]]) < 12


def test_short_clips(clips):
    assert probe(clips["one"]).num_frames == 1
    assert probe(clips["five"]).num_frames == 5
    assert read_frames(clips["one"], [0, 0]).shape == (2, H, W, 3)


def test_indices_in_requested_order_and_bounds(clips):
    info = probe(clips["h264"])
    full = read_frames(info, range(N))
    assert np.array_equal(read_frames(info, [5, 1, 5, 0]), full[[5, 1, 5, 0]])
    assert read_frames(info, []).shape == (0, H, W, 3)
    with pytest.raises(IndexError, match="outside 0..8"):
        read_frames(info, [9])


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "bmp", "gif"])
def test_stills(clips, ext):
    info = probe(clips[ext])
    assert (info.kind, info.num_frames, info.width, info.height, info.backend) == ("image", 1, W, H, "pillow")
    frames = read_frames(info, [0])
    assert frames.shape == (1, H, W, 3)
    assert mean_diff(frames[0], clips["frames"][0]) < (25 if ext == "gif" else 10)  # gif: 256-colour palette


def test_exif_orientation(clips):
    info = probe(clips["exif_jpg"])
    assert (info.width, info.height, info.rotation) == (H, W, 90)
    frame = read_frames(info, [0])[0]
    assert mean_diff(frame, np.rot90(clips["frames"][0], k=-1)) < 8


def test_grey_and_alpha(clips):
    for name in ("grey", "grey_png", "grey16_png"):
        frames = read_frames(clips[name], [0])
        assert frames.shape == (1, H, W, 3)
        assert np.array_equal(frames[..., 0], frames[..., 2]), name
        assert mean_diff(frames[0, ..., 0], clips["frames"][0, ..., 1 if name == "grey" else 0]) < 6, name
    assert probe(clips["grey"]).pix_fmt == "gray"
    assert probe(clips["grey16_png"]).bit_depth == 16
    rgba = read_frames(clips["rgba_png"], [0])[0]
    assert (rgba[:, W // 2 :] == 255).all()  # transparent half composited on white
    assert mean_diff(rgba[:, : W // 2], clips["frames"][0, :, : W // 2]) < 1


@pytest.mark.parametrize("name", ["audio_track", "audio_track_webm"])
def test_audio_track_is_ignored(clips, name):
    info = probe(clips[name])
    assert (info.num_frames, info.note) == (N, "")
    assert mean_diff(read_frames(info, range(N)), clips["frames"]) < 12


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty", "empty file"),
        ("random", "not a readable media file"),
        ("text", "not a readable media file"),
        ("audio_m4a", "audio only"),
        ("audio_mp4", "audio only"),
        ("audio_mp3", "audio only"),
        ("trunc_noindex", "not a readable media file"),  # mp4 index was at the end
    ],
)
def test_broken_files_raise_media_error(clips, name, reason):
    with pytest.raises(MediaError, match=reason) as e:
        probe(clips[name])
    assert e.value.path == str(clips[name]) and str(clips[name]) in str(e.value)
    with pytest.raises(MediaError):
        read_frames(clips[name], [0])


def test_missing_file():
    with pytest.raises(MediaError, match="no such file"):
        probe("/nonexistent/clip.mp4")


def test_truncated_with_index_decodes_what_it_can(clips):
    info = probe(clips["trunc_faststart"])
    assert 0 < info.num_frames < 60
    assert "of 60 frames decode" in info.note
    assert info.backend == "pyav"  # decord cannot open it
    frames = read_frames(info, range(info.num_frames))
    whole = read_frames(clips["trunc_full"], range(info.num_frames))
    assert mean_diff(frames, whole) < 12  # same content as the intact file (mjpeg vs h264 encode)
    with pytest.raises(IndexError):
        read_frames(info, [info.num_frames])


def test_truncated_mkv_reports_short_duration(clips):
    info = probe(clips["trunc_mkv"])
    assert 0 < info.num_frames < 60 and "in its header decode" in info.note
    assert read_frames(info, range(info.num_frames)).shape[0] == info.num_frames


def test_mediainfo_round_trips_json(clips):
    info = probe(clips["vfr"])
    assert MediaInfo.from_dict(json.loads(json.dumps(dataclasses.asdict(info)))) == info


def test_write_video_refuses_what_it_cannot_write(tmp_path):
    f = synth.pattern_frames(3, W, H)
    with pytest.raises(ValueError, match="did not keep rotation"):
        media.write_video(tmp_path / "r.avi", f, codec="mjpeg", rotation=90)  # AVI has no display matrix
    assert not (tmp_path / "r.avi").exists()
    with pytest.raises(ValueError, match="even width and height"):
        media.write_video(tmp_path / "odd.mp4", synth.pattern_frames(3, 33, 20))
    with pytest.raises(ValueError, match="strictly increasing"):
        media.write_video(tmp_path / "t.mkv", f, timestamps=[0.0, 0.2, 0.1])


def test_product_code_writes_video_without_the_synthetic_data_module():
    """write_video/write_image live in data.media; data.synth (patterns, broken files) is for demos and tests."""
    code = "import sys, data.inspect, trainer.sample, trainer.validation; assert 'data.synth' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=cli_env(), timeout=300)
    assert "data.synth" not in inspect.getsource(data_inspect)  # its writer import is inside a function


def test_a_failed_encode_leaves_the_previous_video_and_no_partial_file(tmp_path, monkeypatch):
    """Validation videos and samples are rewritten in place: a crash mid-encode must not truncate them."""
    path = media.write_video(tmp_path / "sample.mp4", synth.pattern_frames(4, 32, 32, seed=1))
    before = path.read_bytes()
    real, calls = av.VideoFrame.from_ndarray, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-encode")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_on_third)
    with pytest.raises(RuntimeError, match="killed mid-encode"):
        media.write_video(path, synth.pattern_frames(6, 32, 32, seed=2))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sample.mp4"]
    monkeypatch.undo()
    assert probe(media.write_video(path, synth.pattern_frames(6, 32, 32, seed=2))).num_frames == 6
