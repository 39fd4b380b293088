"""`vidlora prepare` end to end on real files (every codec family users bring, rotation, VFR, stills, short
and long clips, broken files of each kind) with the tiny Wan VAE and text encoder, through the real CLI."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data import media, synth
from data.cache import load_entry, read_meta
from data.dataset import CachedDataset
from data.inspect import inspect_cache
from data.media import probe
from tests.conftest import run_cli, write_recipe

pytestmark = pytest.mark.slow

W, H = 64, 48
FRAMES = synth.pattern_frames(17, W, H, seed=1)
PORTRAIT = synth.pattern_frames(17, H, W, seed=2)  # 48 wide, 64 tall
# A variable-frame-rate clip: 8 frames at ~33 fps, then 7 at ~6.7 fps. Resampled to Wan's 16 fps, output
# frame k is the source frame nearest to k/16 s (every grid time is >= 2.5 ms from a tie).
VFR_TIMES = [0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.36, 0.51, 0.66, 0.81, 0.96, 1.11, 1.26]
VFR_HEAD_9 = [0, 2, 4, 6, 7, 8, 8, 9, 9]  # grid 0, .0625, .125, .1875, .25, .3125, .375, .4375, .5


def recipe(tmp: Path, model: Path, datasets: str, cache: str = "cache", data: str = "") -> Path:
    return write_recipe(
        tmp / f"{cache}.toml",
        f"""
[model]
path = "{model}"
[data]
cache_dir = "{tmp / cache}"
cache_dtype = "fp32"
decode_workers = 2
{data}
{datasets}
""",
    )


def caption(path: Path, text: str | None = None) -> Path:
    path.with_suffix(".txt").write_text(text or f"a clip called {path.stem}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Every kind of file a user's folder holds, each with a sidecar caption; name -> path."""
    d = tmp_path_factory.mktemp("zoo")
    good = {
        "h264": media.write_video(d / "h264 clip.mp4", FRAMES),
        "hevc10": media.write_video(d / "hevc10.mp4", FRAMES, codec="hevc", pix_fmt="yuv420p10le"),
        "vp9": media.write_video(d / "vp9.webm", FRAMES, codec="vp9"),  # alt-ref frames: decord fails, PyAV reads
        "mjpeg": media.write_video(d / "mjpeg.avi", FRAMES, codec="mjpeg"),
        "grey": media.write_video(d / "grey.mp4", FRAMES[..., 1], codec="hevc", pix_fmt="gray"),
        # Stored landscape, displayed portrait (a phone held upright): shows the PORTRAIT frames.
        "rotated": media.write_video(d / "rotated.mp4", np.rot90(PORTRAIT, k=1, axes=(1, 2)).copy(), rotation=90),
        "portrait": media.write_video(d / "portrait.mp4", PORTRAIT),
        "upside_down": media.write_video(d / "upside_down.mp4", PORTRAIT[:, ::-1, ::-1].copy()),
        "vfr": media.write_video(d / "vfr.mp4", synth.pattern_frames(15, W, H, seed=3), timestamps=VFR_TIMES),
        "long": media.write_video(d / "long.mp4", synth.pattern_frames(100, W, H, seed=4), g="24"),
        "one": media.write_video(d / "one frame.mp4", FRAMES[:1]),
        "five": media.write_video(d / "five.mp4", FRAMES[:5]),
        "png": media.write_image(d / "still.png", FRAMES[0]),
        "jpg": media.write_image(d / "фото café.jpg", FRAMES[3]),
        "cut_tail": synth.truncate_file(  # index first: the first part still decodes
            media.write_video(
                d / "cut_tail.mp4",
                synth.pattern_frames(60, W, H, 5),
                codec="mjpeg",
                container_options={"movflags": "faststart"},
            )
        ),
        "cut_webm": synth.truncate_file(
            media.write_video(d / "cut.webm", synth.pattern_frames(60, W, H, 9), codec="vp9")
        ),
    }
    broken = {
        "empty": synth.write_empty(d / "empty.mp4"),
        "text": synth.write_text(d / "notes.mp4"),
        "random": synth.write_random_bytes(d / "random.mov"),
        "audio": synth.write_audio(d / "song.m4a"),
        "truncated": synth.truncate_file(media.write_video(d / "truncated.mp4", synth.pattern_frames(60, W, H, 6))),
        "broken_png": synth.truncate_file(media.write_image(d / "broken.png", FRAMES[0]), keep=0.3),
        "broken_jpg": synth.truncate_file(media.write_image(d / "broken.jpg", FRAMES[0]), keep=0.3),
        "stub_webm": synth.truncate_file(media.write_video(d / "stub.webm", FRAMES, codec="vp9"), keep=0.02),
    }
    for path in [*good.values(), *broken.values()]:
        caption(path)
    good["no_caption"] = media.write_video(d / "no caption.mp4", FRAMES[:9])  # missing_caption = "skip"
    return {**good, **broken}


BROKEN = {  # file -> words its reason must contain
    "empty": "empty file",
    "text": "not a media file",
    "random": "not a media file",
    "audio": "audio only",
    "truncated": "not a readable media file",
    "broken_png": "does not decode",
    "broken_jpg": "corrupt",
    "stub_webm": "not a readable media file",
    "no_caption": "no caption file",
}
EXPECTED = {  # file -> (windows as (start, length), displayed orientation) under head mode, target_frames [9, 17]
    **{
        k: ([(0, 9), (0, 17)], "landscape")
        for k in ("h264", "hevc10", "vp9", "mjpeg", "grey", "long", "cut_tail", "cut_webm")
    },
    **{k: ([(0, 9), (0, 17)], "portrait") for k in ("rotated", "portrait", "upside_down")},
    "vfr": ([(0, 9), (0, 17)], "landscape"),
    "one": ([(0, 1)], "landscape"),  # shorter than every target: its longest 4k+1 length, never dropped
    "five": ([(0, 5)], "landscape"),
    "png": ([(0, 1)], "landscape"),
    "jpg": ([(0, 1)], "landscape"),
}


@pytest.fixture(scope="module")
def zoo_run(zoo, tiny_wan, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo_run")
    datasets = f"""
[[data.datasets]]
path = "{zoo["h264"].parent}"
missing_caption = "skip"
resolutions = [64]
target_frames = [9, 17]
"""
    r = recipe(tmp, tiny_wan, datasets)
    proc = run_cli("prepare", r)
    return tmp / "cache", proc, r


def test_every_good_file_is_cached_with_exact_windows_and_shapes(zoo, zoo_run):
    cache, proc, _ = zoo_run
    index = json.loads((cache / "index.json").read_text())
    by_source = {}
    for s in index["samples"]:
        by_source.setdefault(s["source"], []).append(s)
    for name, (windows, orientation) in EXPECTED.items():
        samples = by_source.pop(str(zoo[name].resolve()))
        assert sorted((s["frames"][0], len(s["frames"])) for s in samples) == windows, name
        for s in samples:
            w, h = s["bucket"]
            assert (w < h) == (orientation == "portrait") and (w, h) in ((80, 48), (48, 80)), (name, s["bucket"])
            entry = load_entry(cache / s["file"])
            latent_frames = (len(s["frames"]) - 1) // 4 + 1  # the VAE keeps frame 1, then compresses time 4x
            assert entry["latents"].shape == (16, latent_frames, h // 8, w // 8), name
            assert entry["latents"].dtype == torch.float32 and torch.isfinite(entry["latents"]).all()
            meta = read_meta(cache / s["file"])
            assert meta["source"] == str(zoo[name].resolve()) and meta["frames"] == s["frames"]
            assert meta["fingerprint"] == s["fingerprint"] and meta["bucket"] == [w, h]
            assert [read_meta(cache / "text" / f"{t}.safetensors")["caption"] for t in s["text_ids"]] == [
                f"a clip called {zoo[name].stem}"
            ]
    assert by_source == {}, "samples from files that should not have made any"

    # VFR: frames picked by timestamp on a 16 fps grid, not by index.
    vfr = {len(s["frames"]): s["frames"] for s in index["samples"] if s["source"] == str(zoo["vfr"].resolve())}
    assert vfr[9] == VFR_HEAD_9


def test_rotation_is_applied_before_encoding(zoo, zoo_run):
    """The rotated file shows the same picture as the portrait one: same latents up to codec noise, and far
    from the picture turned the other way round (what a wrong rotation direction would give)."""
    cache = zoo_run[0]
    index = json.loads((cache / "index.json").read_text())

    def latents(name):
        (s,) = [s for s in index["samples"] if s["source"] == str(zoo[name].resolve()) and len(s["frames"]) == 17]
        return load_entry(cache / s["file"])["latents"]

    rotated, portrait, upside_down = latents("rotated"), latents("portrait"), latents("upside_down")
    assert (rotated - portrait).abs().mean() < 0.3 * (rotated - upside_down).abs().mean()


def test_every_bad_input_is_reported_by_name_with_a_reason(zoo, zoo_run):
    cache, proc, _ = zoo_run
    report = json.loads((cache / "report.json").read_text())
    rows = {Path(r["path"]).name: r for r in report["inputs"]}
    for name, words in BROKEN.items():
        row = rows[zoo[name].name]
        assert row["status"] in ("failed", "skipped") and words in row["reason"], row
        assert f"{zoo[name].name}: " in proc.stdout  # the console summary names it too
    for name, (windows, _) in EXPECTED.items():
        row = rows[zoo[name].name]
        assert row["status"] == "ok" and row["samples"] == len(windows) and row["windows"] == [list(w) for w in windows]
        assert len(row["buckets"]) == 1
    assert [name for name, r in rows.items() if r.get("caption_missing")] == [zoo["no_caption"].name]
    for cut in ("cut_tail.mp4", "cut.webm"):  # the part that decodes is used, and the report says so
        assert "truncated" in rows[cut]["note"] and rows[cut]["frames"] < 60
    assert report["samples"] == report["encoded_now"] == sum(len(w) for w, _ in EXPECTED.values())
    assert report["counts"]["ok"] == len(EXPECTED)


def test_strict_fails_a_run_with_bad_inputs_and_a_rerun_does_no_work(zoo_run):
    cache, _, r = zoo_run
    entries = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    proc = run_cli("prepare", r, "--strict", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((cache / "report.json").read_text())
    assert report["encoded_now"] == report["texts_encoded_now"] == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == entries


def test_dry_run_reports_the_plan_without_encoding(zoo, zoo_run, tiny_wan, tmp_path):
    from data.prepare import prepare
    from trainer.config import load_recipe
    from trainer.models import get_family

    r = load_recipe(zoo_run[2], [f"data.cache_dir={json.dumps(str(tmp_path / 'dry'))}"])
    assert prepare(r, get_family(r.model), dry_run=True) == 0
    report = json.loads((tmp_path / "dry/report.json").read_text())
    assert report["dry_run"] and report["encoded_now"] == 0 and not (tmp_path / "dry/index.json").exists()
    assert not list((tmp_path / "dry").rglob("*.safetensors"))
    real = json.loads((zoo_run[0] / "report.json").read_text())
    assert report["buckets"] == real["buckets"] and report["counts"] == real["counts"]


def test_nothing_usable_exits_non_zero(zoo, tiny_wan, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("empty", "random", "truncated"):
        shutil.copy(zoo[name], folder / zoo[name].name)
        shutil.copy(zoo[name].with_suffix(".txt"), folder / f"{zoo[name].stem}.txt")
    r = recipe(tmp_path, tiny_wan, f'[[data.datasets]]\npath = "{folder}"\nresolutions = [64]\ntarget_frames = [9]')
    proc = run_cli("prepare", r, check=False)
    assert proc.returncode == 1
    assert "prepared 0 samples" in proc.stdout
    for name in ("empty", "random", "truncated"):
        assert zoo[name].name in proc.stdout


@pytest.fixture(scope="module")
def modes_run(tiny_wan, tmp_path_factory):
    """Several datasets in one recipe over the same clips, one per window mode, plus a metadata file with
    several captions per clip, extra columns, a trigger word and repeats."""
    tmp = tmp_path_factory.mktemp("modes")
    clips = tmp / "clips"
    caption(media.write_video(clips / "forty.mp4", synth.pattern_frames(40, W, H, seed=7)))
    caption(media.write_video(clips / "three.mp4", FRAMES[:3]))
    caption(media.write_image(clips / "still.png", FRAMES[0]))
    (tmp / "meta.jsonl").write_text(
        json.dumps({"path": "clips/forty.mp4", "caption": ["first caption", "second caption"], "score": 0.9})
        + "\n"
        + json.dumps({"path": "clips/three.mp4", "caption": "[trigger] in three frames", "tags": ["a", "b"]})
        + "\n",
        encoding="utf-8",
    )
    common = 'resolutions = [64]\nmissing_caption = "skip"'
    datasets = f"""
[[data.datasets]]
path = "{clips}"
frame_window = "chunk"
target_frames = [9]
{common}
[[data.datasets]]
path = "{clips}"
frame_window = "slide"
frame_stride = 8
target_frames = [9]
{common}
[[data.datasets]]
path = "{clips}"
name = "uniform"
frame_window = "uniform"
window_count = 3
target_frames = [17]
{common}
[[data.datasets]]
path = "{clips}"
name = "full"
frame_window = "full"
max_frames = 33
{common}
[[data.datasets]]
path = "{tmp / "meta.jsonl"}"
trigger = "sks"
repeats = 3
target_frames = [5]
resolutions = [64, 32]
"""
    run_cli("prepare", recipe(tmp, tiny_wan, datasets, data="encode_batch_size = 3"))
    return tmp / "cache", clips


def test_every_window_mode_and_short_clips_in_each(modes_run):
    cache, clips = modes_run
    index = json.loads((cache / "index.json").read_text())
    windows: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for s in index["samples"]:
        windows.setdefault((s["dataset"], Path(s["source"]).stem), []).append((s["frames"][0], len(s["frames"])))
        assert s["frames"] == list(range(s["frames"][0], s["frames"][0] + len(s["frames"])))  # 16 fps: no resampling
    expected = {
        "clips": [(0, 9), (9, 9), (18, 9), (27, 9)],  # chunk: 40 // 9 = 4 windows
        "clips_2": [(0, 9), (8, 9), (16, 9), (24, 9)],  # slide, stride 8: starts 0..31
        "uniform": [(0, 17), (12, 17), (23, 17)],  # 3 starts spread over 0..23
        "full": [(0, 33)],  # the longest 4k+1 <= max_frames
    }
    for name, forty in expected.items():
        assert sorted(windows[(name, "forty")]) == forty, name
        # A 3-frame clip and a still are shorter than every target: one window of what they have, in every mode.
        assert windows[(name, "three")] == [(0, 1)] and windows[(name, "still")] == [(0, 1)], name
    # The metadata dataset: two resolutions, so two buckets per window; repeats and captions carried through.
    meta = [s for s in index["samples"] if s["dataset"] == "meta"]
    assert sorted((Path(s["source"]).stem, *s["bucket"]) for s in meta) == [
        ("forty", 32, 32),
        ("forty", 80, 48),
        ("three", 32, 32),
        ("three", 80, 48),
    ]
    assert all(s["repeats"] == 3 for s in meta) and all(s["repeats"] == 1 for s in index["samples"] if s not in meta)
    text = {
        Path(s["source"]).stem: [read_meta(cache / "text" / f"{t}.safetensors")["caption"] for t in s["text_ids"]]
        for s in meta
    }
    assert text["forty"] == ["sks, first caption", "sks, second caption"]
    assert text["three"] == ["sks in three frames"]
    manifest = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    extras = {Path(m["path"]).stem: json.loads(m["extra"]) for m in manifest if m["dataset"] == "meta"}
    assert extras == {"forty": {"score": 0.9}, "three": {"tags": ["a", "b"]}}

    # The training side reads it: one item per sample and repeat, a caption drawn from each sample's own.
    data = CachedDataset(cache)
    assert len(data) == len(index["samples"]) + 2 * len(meta)
    item = data[0]
    assert item["latents"].shape[0] == 16 and item["text"]["prompt_embeds"].shape[-1] == 32


def test_inspect_counts_and_decodes_back_to_video(modes_run, tmp_path):
    cache, _ = modes_run
    index = json.loads((cache / "index.json").read_text())
    proc = run_cli("inspect", cache, "--decode", "3", "--out", tmp_path / "seen")
    out = proc.stdout
    assert f"{len(index['samples'])} samples" in out and "entries: all" in out
    shapes = {(*s["bucket"], len(s["frames"])) for s in index["samples"]}
    for w, h, f in shapes:
        count = sum(1 for s in index["samples"] if (*s["bucket"], len(s["frames"])) == (w, h, f))
        assert f"  {w}x{h} x {f}: {count}\n" in out
    seconds = sum(len(s["frames"]) / s["fps"] for s in index["samples"] if len(s["frames"]) > 1)
    assert f"duration: {seconds:.1f} s" in out
    decoded = sorted((tmp_path / "seen").iterdir())
    assert len(decoded) == 3 and all(f"decoded: {p}" in out for p in decoded)
    by_stem = {Path(s["file"]).stem: s for s in index["samples"]}
    seen_shapes = set()
    for p in decoded:  # each decodes to its sample's bucket and length, one per shape
        s = by_stem[p.stem]
        info = probe(p)
        assert (info.width, info.height, info.num_frames) == (*s["bucket"], len(s["frames"])), p
        seen_shapes.add((*s["bucket"], len(s["frames"])))
    assert len(seen_shapes) == 3

    # A missing entry is reported, not hidden.
    victim = cache / index["samples"][0]["file"]
    saved = victim.read_bytes()
    victim.unlink()
    try:
        assert f"{victim.relative_to(cache)}: missing or unreadable" in inspect_cache(cache)
    finally:
        victim.write_bytes(saved)


def test_decode_video_inverts_the_latent_normalisation(tiny_wan):
    """What inspect decodes is what the pipeline would decode: normalised latents back to raw ones."""
    from trainer.config import ModelSection
    from trainer.models import get_family

    family = get_family(ModelSection(path=str(tiny_wan)))
    vae = family.load_vae().eval()
    pixels = torch.from_numpy(FRAMES[:9]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        cached = family.encode_video(vae, pixels)["latents"]
        raw = vae.encode(pixels).latent_dist.mode()
        assert not torch.allclose(cached, raw)  # really normalised
        assert torch.allclose(family.decode_video(vae, cached), vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)


def test_vae_tiling_is_used_for_large_frames_and_is_part_of_the_fingerprint(tiny_wan, tmp_path):
    """A 320x240 still at resolution 288 is wider than the Wan VAE's 256-px tile: with tiling on it is encoded
    in tiles (close to, but not the same as, one pass), and toggling tiling re-encodes the entry."""
    from data.prepare import prepare
    from trainer.config import load_recipe
    from trainer.models import get_family

    media.write_image(tmp_path / "clips/big.png", synth.pattern_frames(1, 320, 240, seed=8)[0])
    caption(tmp_path / "clips/big.png")
    r = recipe(tmp_path, tiny_wan, f'[[data.datasets]]\npath = "{tmp_path / "clips"}"\nresolutions = [288]')
    latents, encoded = {}, {}
    for tiling in ("false", "true"):
        tiled = load_recipe(r, [f"data.vae_tiling={tiling}"])
        assert prepare(tiled, get_family(tiled.model)) == 0
        index = json.loads((tmp_path / "cache/index.json").read_text())
        (sample,) = index["samples"]
        assert sample["bucket"][0] > 256
        latents[tiling] = load_entry(tmp_path / "cache" / sample["file"])["latents"]
        encoded[tiling] = json.loads((tmp_path / "cache/report.json").read_text())["encoded_now"]
    assert encoded == {"false": 1, "true": 1}
    one_pass, tiled = latents["false"], latents["true"]
    assert one_pass.shape == tiled.shape and not torch.equal(one_pass, tiled)
    assert (one_pass - tiled).abs().mean() < 0.05 * one_pass.abs().mean()


def test_decode_workers_above_the_core_count_are_capped_without_a_torch_warning(tiny_wan, tmp_path):
    from data.prepare import cpu_cores, prepare
    from trainer.config import load_recipe
    from trainer.models import get_family

    caption(media.write_video(tmp_path / "clips/c.mp4", FRAMES[:5]))
    datasets = f'[[data.datasets]]\npath = "{tmp_path / "clips"}"\nresolutions = [64]\ntarget_frames = [5]'
    r = load_recipe(recipe(tmp_path, tiny_wan, datasets), [f"data.decode_workers={cpu_cores() + 2}"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert prepare(r, get_family(r.model)) == 0
    assert not [w for w in seen if "worker processes in total" in str(w.message)]
