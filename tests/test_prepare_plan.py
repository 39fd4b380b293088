"""The planning pieces of `prepare` on real files: dataset names, the probe cache, fixed batches, and the
cache writes that keep a re-run with nothing to do from touching anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data import media, synth
from data import plan as plan_module
from data.cache import atomic_write, remove_temp_files, write_json
from data.plan import ProbeCache, dataset_names, make_plan
from data.prepare import fixed_batches, format_summary, summarise
from tests.conftest import ROOT
from trainer.config import DatasetSection, RecipeError, load_recipe


def test_dataset_names_are_unique_and_file_safe():
    ds = [
        DatasetSection(path="/data/clips"),
        DatasetSection(path="/other/clips"),
        DatasetSection(path="/x/meta.jsonl"),
        DatasetSection(path="/y/z", name="my set/1"),
    ]
    assert dataset_names(ds) == ["clips", "clips_2", "meta", "my_set_1"]
    with pytest.raises(RecipeError, match="'a' is used twice"):
        dataset_names([DatasetSection(path="/p", name="a"), DatasetSection(path="/q", name="a")])
    # A default name never takes a name given explicitly to another dataset.
    assert dataset_names([DatasetSection(path="/d/a"), DatasetSection(path="/e", name="a")]) == ["a_2", "a"]


def test_probe_cache_probes_each_file_once_until_it_changes(tmp_path, monkeypatch):
    clip = media.write_video(tmp_path / "c.mp4", synth.pattern_frames(5, 32, 32))
    bad = synth.write_random_bytes(tmp_path / "bad.mp4")
    cache = ProbeCache(tmp_path / "probes.json")
    info = cache.probe(str(clip))
    with pytest.raises(plan_module.MediaError):
        cache.probe(str(bad))
    cache.save()

    calls = []
    real = plan_module.probe
    monkeypatch.setattr(plan_module, "probe", lambda p: calls.append(p) or real(p))
    again = ProbeCache(tmp_path / "probes.json")
    assert again.probe(str(clip)) == info  # from the file, not probed
    with pytest.raises(plan_module.MediaError) as e:
        again.probe(str(bad))  # a known failure is remembered too, with its reason
    assert calls == [] and e.value.reason
    mtime = (tmp_path / "probes.json").stat().st_mtime_ns
    again.save()
    assert (tmp_path / "probes.json").stat().st_mtime_ns == mtime  # nothing changed: not rewritten

    media.write_video(clip, synth.pattern_frames(9, 32, 32))  # edited
    assert ProbeCache(tmp_path / "probes.json").probe(str(clip)).num_frames == 9 and calls == [str(clip)]


def test_fixed_batches_group_by_shape_in_order():
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("a", 6)]
    assert fixed_batches(items, lambda x: x[0], 2) == [
        [("a", 1), ("a", 3)],
        [("a", 4), ("a", 6)],
        [("b", 2), ("b", 5)],
    ]


def test_only_if_changed_keeps_the_file_and_temp_files_are_cleaned(tmp_path):
    path = tmp_path / "index.json"
    assert write_json(path, {"a": 1})
    before = path.stat().st_mtime_ns
    assert not write_json(path, {"a": 1}, only_if_changed=True)
    assert path.stat().st_mtime_ns == before and not list(tmp_path.glob(".*.tmp"))
    assert write_json(path, {"a": 2}, only_if_changed=True) and path.read_text() != ""

    def crash(tmp):
        Path(tmp).write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert not list(tmp_path.glob(".*.tmp"))  # an exception cleans up after itself
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.safetensors.abc.tmp").write_text("what a SIGKILL mid-write leaves")
    (tmp_path / "sub" / "user.tmp").write_text("not ours")  # no leading dot: not an atomic_write temp
    assert remove_temp_files(tmp_path) == 1 and (tmp_path / "sub" / "user.tmp").exists()


def test_plan_dedupes_buckets_and_keeps_still_and_short_clips(tmp_path):
    media.write_video(tmp_path / "c.mp4", synth.pattern_frames(3, 64, 48))
    media.write_image(tmp_path / "s.png", synth.pattern_frames(1, 64, 48)[0])
    for stem in ("c", "s"):
        (tmp_path / f"{stem}.txt").write_text("x")
    ds = DatasetSection(
        path=str(tmp_path), resolutions=[64, 65], target_frames=[17], frame_window="slide", frame_stride=4
    )
    plan = make_plan([ds], 16.0, {}, ProbeCache(tmp_path / "p.json"), show_progress=False)
    assert [(s.frames, s.bucket) for s in plan.samples] == [([0], (80, 48)), ([0], (80, 48))]
    assert [r["status"] for r in plan.inputs] == ["ok", "ok"] and plan.samples[1].fps == 0.0
    assert len(plan.manifest) == 2 and set(plan.media) == {s.source for s in plan.samples}


def test_report_gives_windows_in_resampled_frames_and_their_source_frames(tmp_path):
    """docs/data.md: `windows` are [start, length] at target_fps; `source_frames` the source span of each."""
    media.write_video(tmp_path / "c.mkv", synth.pattern_frames(40, 32, 32), fps=24)  # ms timestamps
    synth.write_audio(tmp_path / "a.mp4")  # audio only, in a video container
    for stem in ("c", "a"):
        (tmp_path / f"{stem}.txt").write_text("x")
    ds = DatasetSection(path=str(tmp_path), resolutions=[32], target_frames=[5], frame_window="chunk", target_fps=12)
    probes = ProbeCache(tmp_path / "p.json")
    plan = make_plan([ds], 16.0, {}, probes, show_progress=False)
    probes.save()
    assert [s.frames for s in plan.samples] == [list(range(k, k + 10, 2)) for k in (0, 10, 20, 30)]  # 24 -> 12 fps
    rows = {Path(r["path"]).name: r for r in summarise(plan, plan.samples, {}, 0, 0, 0.0, dry_run=True)["inputs"]}
    assert rows["c.mkv"]["windows"] == [[0, 5], [5, 5], [10, 5], [15, 5]]
    assert rows["c.mkv"]["source_frames"] == [[0, 8], [10, 18], [20, 28], [30, 38]]
    # An audio-only .mp4 is skipped, as docs/data.md says of audio-only files, not "failed" like a broken video.
    assert rows["a.mp4"]["status"] == "skipped" and "audio only" in rows["a.mp4"]["reason"]
    again = make_plan([ds], 16.0, {}, ProbeCache(tmp_path / "p.json"), show_progress=False)  # from the probe cache
    assert [r["status"] for r in again.inputs if r["path"].endswith("a.mp4")] == ["skipped"]


def test_hdr_clips_are_named_in_the_report_and_the_summary(tmp_path):
    synth.write_hdr_video(tmp_path / "phone.mp4", synth.pattern_frames(5, 32, 32), transfer="hlg")
    media.write_video(tmp_path / "plain.mp4", synth.pattern_frames(5, 32, 32))
    for stem in ("phone", "plain"):
        (tmp_path / f"{stem}.txt").write_text("x")
    ds = DatasetSection(path=str(tmp_path), resolutions=[32], target_frames=[5])
    plan = make_plan([ds], 16.0, {}, ProbeCache(tmp_path / "p.json"), show_progress=False)
    report = summarise(plan, plan.samples, {}, 0, 0, 0.0, dry_run=True)
    rows = {Path(r["path"]).name: r for r in report["inputs"]}
    assert rows["phone.mp4"]["color"] == "HDR HLG, BT.2020: tone-mapped to BT.709 SDR"
    assert "color" not in rows["plain.mp4"]
    summary = format_summary(report, tmp_path)
    assert "converted to BT.709 SDR: 1 HDR or wide-gamut video(s)" in summary
    assert f"{tmp_path / 'phone.mp4'}: HDR HLG, BT.2020: tone-mapped" in summary and "plain.mp4" not in summary


@pytest.mark.parametrize("shipped", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.toml")))
def test_short_clips_keep_their_motion_and_a_clip_without_any_is_named(shipped, tmp_path):
    """Issue 19: with target_frames = [1, 33, 49], clips under ~2 s used to give only 1-frame samples, silently."""
    recipe = load_recipe(ROOT / shipped)
    if not recipe.data.datasets:
        pytest.skip("no dataset in this recipe")
    for name, frames in (("half_second", 15), ("second", 36), ("blink", 3)):  # 30 fps
        media.write_video(tmp_path / f"{name}.mp4", synth.pattern_frames(frames, 32, 32), fps=30)
    media.write_image(tmp_path / "still.png", synth.pattern_frames(1, 32, 32)[0])
    for stem in ("half_second", "second", "blink", "still"):
        (tmp_path / f"{stem}.txt").write_text("x")
    ds = recipe.data.datasets[0].model_copy(update={"path": str(tmp_path), "resolutions": [32]})
    plan = make_plan([ds], 16.0, {}, ProbeCache(tmp_path / "p.json"), show_progress=False)
    longest = {}
    for s in plan.samples:
        longest[Path(s.source).stem] = max(longest.get(Path(s.source).stem, 0), len(s.frames))
    # their longest 4k+1 window at least (or the recipe's longest target, when that is shorter)
    assert longest["half_second"] >= 5 and longest["second"] >= min(17, max(ds.target_frames)), longest
    assert longest["blink"] == longest["still"] == 1
    report = summarise(plan, plan.samples, {}, 0, 0, 0.0, dry_run=True)
    rows = {Path(r["path"]).stem: r for r in report["inputs"]}
    assert [k for k, r in rows.items() if "no_motion" in r] == ["blink"]  # the still is no video
    assert "the shortest window is 5" in rows["blink"]["no_motion"]
    summary = format_summary(report, tmp_path)
    assert "no multi-frame sample from 1 video(s)" in summary and f"{tmp_path / 'blink.mp4'}: " in summary


def test_a_folder_used_by_two_datasets_is_summarised_once(tmp_path):
    media.write_video(tmp_path / "c.mp4", synth.pattern_frames(9, 32, 32))
    synth.write_text(tmp_path / "notes.mp4")  # not media
    for stem in ("c", "notes"):
        (tmp_path / f"{stem}.txt").write_text("x")
    datasets = [
        DatasetSection(path=str(tmp_path), resolutions=[32], target_frames=[9]),
        DatasetSection(path=str(tmp_path), name="short", resolutions=[32], target_frames=[5]),
    ]
    plan = make_plan(datasets, 16.0, {}, ProbeCache(tmp_path / "p.json"), show_progress=False)
    report = summarise(plan, plan.samples, {}, 0, 0, 0.0, dry_run=True)
    assert len(report["inputs"]) == 6  # report.json keeps a row per dataset and file: each has its own samples
    assert report["counts"] == {"ok": 1, "skipped": 2}  # files: c.mp4; notes.mp4 and its caption notes.txt
    summary = format_summary(report, tmp_path)
    assert summary.count("notes.mp4: not a media file") == 1
    assert summary.count("notes.txt: caption file for notes.mp4, which is not used: not a media file") == 1


def test_extra_metadata_columns_survive_the_manifest_whatever_their_types(tmp_path):
    """docs/data.md: other columns go into `extra`, a JSON object string, so rows may disagree on types."""
    from datasets import load_dataset

    from data.prepare import _write_manifest

    for name in ("a", "b"):
        media.write_video(tmp_path / f"{name}.mp4", synth.pattern_frames(5, 32, 32))
    rows = [{"path": "a.mp4", "caption": "x", "score": 0.9}, {"path": "b.mp4", "caption": "y", "score": "high"}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = DatasetSection(path=str(tmp_path / "meta.jsonl"), resolutions=[32], target_frames=[5])
    _write_manifest(make_plan([ds], 16.0, {}, ProbeCache(tmp_path / "p.json"), False), tmp_path / "manifest.jsonl")
    loaded = load_dataset("json", data_files=str(tmp_path / "manifest.jsonl"), cache_dir=str(tmp_path / "hf"))
    assert [json.loads(e) for e in loaded["train"]["extra"]] == [{"score": 0.9}, {"score": "high"}]
