import json
import shutil

import pytest

from data import media, synth
from data.discover import DiscoveryError, apply_trigger, discover, read_captions, sniff

FRAMES = synth.pattern_frames(5, 32, 32, seed=0)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """One file of each kind, copied into each test's tree (encoding once keeps the suite fast)."""
    d = tmp_path_factory.mktemp("sources")
    return {
        "mp4": media.write_video(d / "a.mp4", FRAMES),
        "webm": media.write_video(d / "a.webm", FRAMES, codec="vp9"),
        "ts": media.write_video(d / "a.ts", FRAMES),
        "avi": media.write_video(d / "a.avi", FRAMES, codec="mjpeg"),
        "mov": media.write_video(d / "a.mov", FRAMES, codec="prores"),
        "png": media.write_image(d / "a.png", FRAMES[0]),
        "jpg": media.write_image(d / "a.jpg", FRAMES[0]),
        "webp": media.write_image(d / "a.webp", FRAMES[0]),
        "gif": media.write_image(d / "a.gif", FRAMES[0]),
        "bmp": media.write_image(d / "a.bmp", FRAMES[0]),
        "y4m": media.write_video(d / "a.y4m", FRAMES, codec="rawvideo", pix_fmt="yuv420p"),
        "h264": media.write_video(d / "a.h264", FRAMES),  # Annex B elementary stream: no container magic
        "ivf": media.write_video(d / "a.ivf", FRAMES, codec="vp9"),
        "m4a": synth.write_audio(d / "a.m4a"),
        "mp3": synth.write_audio(d / "a.mp3"),
        "ogg": synth.write_audio(d / "a.ogg"),
        "truncated": synth.truncate_file(media.write_video(d / "t.mp4", FRAMES)),
    }


def put(sources, kind, dest, caption=None):
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(sources[kind], dest)
    if caption is not None:
        dest.with_suffix(".txt").write_bytes(caption.encode() if isinstance(caption, str) else caption)
    return dest


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("mp4", "video"),
        ("webm", "video"),
        ("ts", "video"),
        ("avi", "video"),
        ("mov", "video"),
        ("y4m", "video"),
        ("h264", "video"),
        ("ivf", "video"),
        ("png", "image"),
        ("jpg", "image"),
        ("webp", "image"),
        ("gif", "image"),
        ("bmp", "image"),
        ("m4a", "audio"),
        ("mp3", "audio"),
        ("ogg", "audio"),
    ],
)
def test_sniff_by_content(sources, tmp_path, kind, expected):
    renamed = shutil.copy(sources[kind], tmp_path / "no_extension")
    assert sniff(renamed) == expected


def test_sniff_rejects_non_media(tmp_path):
    assert sniff(synth.write_text(tmp_path / "x.mp4")) is None
    assert sniff(synth.write_random_bytes(tmp_path / "x.mkv")) is None
    assert sniff(synth.write_empty(tmp_path / "x.webm")) is None
    assert sniff(synth.write_text(tmp_path / "x.json", '{"a": 1}')) is None
    assert sniff(synth.write_text(tmp_path / "x.srt", "1\n00:00:00,000 --> 00:00:01,000\nhé\n")) is None
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a":{}}' + bytes(4096))
    assert sniff(tmp_path / "x.safetensors") is None


def test_read_captions_cleans_text(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("\ufeff  first caption \r\n\r\n\tsecond caption\r\n   \n".encode())
    assert read_captions(p) == ["first caption", "second caption"]


def test_apply_trigger():
    assert apply_trigger("a cat", "sks") == "sks, a cat"
    assert apply_trigger("a photo of [trigger] cat", "sks") == "a photo of sks cat"
    assert apply_trigger("sks, a cat", "sks") == "sks, a cat"
    assert apply_trigger("a cat", None) == "a cat"


@pytest.fixture
def tree(sources, tmp_path):
    root = tmp_path / "data set"
    put(sources, "mp4", root / "clip a.mp4", "\ufeffa red ball\r\na ball, red\r\n")
    put(sources, "webm", root / "sub" / "ünïcode clip.webm", "ünïcode caption")
    put(sources, "ts", root / "sub" / "deep" / "camera.MTS", "camera clip")
    put(sources, "mp4", root / "no_extension", "mp4 without extension")
    put(sources, "png", root / "still.png", "a still")
    put(sources, "jpg", root / "photo.JPG", "a photo")
    put(sources, "mp4", root / "no caption.mp4")
    put(sources, "mp4", root / "blank.mp4", "  \r\n\n")
    put(sources, "mp4", root / "latin1.mp4", "caf\xe9".encode("latin-1"))
    synth.write_text(root / "fake.mp4")
    synth.write_random_bytes(root / "random.mkv")
    put(sources, "m4a", root / "song.m4a", "a song")  # a caption for a file that is media, but not video
    synth.write_text(root / "notes.md", "# notes\n")
    synth.write_text(root / "orphan.txt", "caption of nothing")
    synth.write_text(root / "stats.csv", "a,b\n1,2\n")
    synth.write_text(root / ".DS_Store", "x")
    put(sources, "mp4", root / ".cache" / "hidden.mp4", "hidden")
    return root


def reasons(found):
    return {p.rsplit("/", 1)[-1]: r for p, r in ((i.path, i.reason) for i in found)}


def test_walk_finds_media_by_content_and_reports_the_rest(tree):
    found = discover(tree, missing_caption="skip")
    items = {i.path.rsplit("/", 1)[-1]: i for i in found.items}
    assert set(items) == {"clip a.mp4", "ünïcode clip.webm", "camera.MTS", "no_extension", "still.png", "photo.JPG"}
    assert items["clip a.mp4"].captions == ["a red ball", "a ball, red"]
    assert items["ünïcode clip.webm"].captions == ["ünïcode caption"]
    assert (items["still.png"].kind, items["camera.MTS"].kind) == ("image", "video")
    assert all(i.caption_source == "sidecar" for i in found.items)
    skipped = reasons(found.skipped)
    assert skipped["no caption.mp4"] == "no caption file no caption.txt"
    assert "empty" in skipped["blank.mp4"]
    assert "not UTF-8" in skipped["latin1.mp4"]
    assert "not a media file" in skipped["fake.mp4"] and "not a media file" in skipped["random.mkv"]
    assert "not a media file" in skipped["notes.md"]
    assert "audio only" in skipped["song.m4a"]
    assert "no media file" in skipped["orphan.txt"]
    assert skipped["song.txt"] == "caption file for song.m4a, which is not used: audio only, no video"
    assert "not read as metadata" in skipped["stats.csv"]
    assert skipped[".DS_Store"] == "hidden file" and "hidden folder" in skipped[".cache"]
    assert found.notes == []
    json.dumps(found.to_dict())  # plain data for the manifest


def test_missing_caption_error_lists_every_file(tree):
    with pytest.raises(DiscoveryError) as e:
        discover(tree)
    message = str(e.value)
    assert message.startswith("3 media file(s) have no caption")
    for name in ("no caption.mp4", "blank.mp4", "latin1.mp4"):
        assert name in message


def test_missing_caption_default(tree):
    found = discover(tree, missing_caption="use_default", default_caption="a video", trigger="sks")
    items = {i.path.rsplit("/", 1)[-1]: i for i in found.items}
    assert items["no caption.mp4"].captions == ["sks, a video"]
    assert items["no caption.mp4"].caption_source == "default"
    assert items["clip a.mp4"].captions == ["sks, a red ball", "sks, a ball, red"]
    assert set(reasons(found.notes)) == {"no caption.mp4", "blank.mp4", "latin1.mp4"}
    assert all("default caption used" in r for r in reasons(found.notes).values())
    with pytest.raises(ValueError, match="default_caption"):
        discover(tree, missing_caption="use_default")
    with pytest.raises(ValueError, match="missing_caption"):
        discover(tree, missing_caption="ignore")


def test_caption_extension_option(sources, tmp_path):
    put(sources, "mp4", tmp_path / "a.mp4")
    (tmp_path / "a.caption").write_text("from .caption")
    assert discover(tmp_path, caption_ext="caption").items[0].captions == ["from .caption"]


def test_probe_media_reports_undecodable(sources, tmp_path):
    put(sources, "mp4", tmp_path / "good.mp4", "good")
    put(sources, "truncated", tmp_path / "cut.mp4", "cut")
    found = discover(tmp_path, probe_media=True)
    assert [i.path.rsplit("/", 1)[-1] for i in found.items] == ["good.mp4"]
    assert found.items[0].info["num_frames"] == 5
    assert "not a readable media file" in reasons(found.skipped)["cut.mp4"]


def test_metadata_jsonl_and_csv(sources, tmp_path):
    put(sources, "mp4", tmp_path / "clips" / "a.mp4", "sidecar loses to metadata")
    put(sources, "png", tmp_path / "clips" / "b.png")
    put(sources, "webm", tmp_path / "other" / "c d.webm")
    (tmp_path / "meta.jsonl").write_text(
        '{"path": "clips/a.mp4", "caption": "from jsonl", "fps": 24}\n\n'
        '{"path": "clips/b.png", "caption": ["one", " two "], "tags": ["x"]}\n'
    )
    (tmp_path / "other" / "list.csv").write_text('path,caption,style\r\nc d.webm,"csv, caption",anime\r\n')
    found = discover(tmp_path)
    items = {i.path.rsplit("/", 1)[-1]: i for i in found.items}
    assert items["a.mp4"].captions == ["from jsonl"] and items["a.mp4"].extra == {"fps": 24}
    assert items["a.mp4"].caption_source == "metadata meta.jsonl:1"
    assert items["b.png"].captions == ["one", "two"] and items["b.png"].caption_source == "metadata meta.jsonl:3"
    assert items["c d.webm"].captions == ["csv, caption"] and items["c d.webm"].extra == {"style": "anime"}
    assert len(found.items) == 3
    assert "metadata file captions" in reasons(found.skipped)["a.txt"]
    # The metadata file itself can be the root.
    only = discover(tmp_path / "meta.jsonl", trigger="sks")
    assert [i.captions for i in only.items] == [["sks, from jsonl"], ["sks, one", "sks, two"]]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        (
            "m.jsonl",
            '{"path": "a.mp4", "caption": "ok"}\n{"path": "a.mp4", "caption": }\n',
            "m.jsonl:2: not valid JSON",
        ),
        ("m.jsonl", '{"path": "a.mp4"}\n["a.mp4"]\n', "m.jsonl:2: expected a JSON object"),
        (
            "m.jsonl",
            '{"file": "a.mp4", "caption": "x"}\n',
            "m.jsonl:1: needs a 'path' string \\(keys: file, caption\\)",
        ),
        ("m.jsonl", '{"path": "missing.mp4", "caption": "x"}\n', "m.jsonl:1: 'missing.mp4' does not exist"),
        ("m.jsonl", '{"path": "a.mp4", "caption": 3}\n', "m.jsonl:1: 'caption' must be a string or a list"),
        ("m.csv", "path,caption\na.mp4,ok\na.mp4\n", "m.csv:3: expected 2 columns"),
        ("m.csv", "path,caption\na.mp4,ok,extra\n", "m.csv:2: expected 2 columns"),
    ],
)
def test_malformed_metadata_names_file_and_line(sources, tmp_path, name, text, match):
    put(sources, "mp4", tmp_path / "a.mp4")
    (tmp_path / name).write_text(text)
    with pytest.raises(DiscoveryError, match=match):
        discover(tmp_path, missing_caption="skip")


def test_metadata_file_root_needs_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,caption\na.mp4,x\n")
    with pytest.raises(DiscoveryError, match="needs a 'path' column"):
        discover(tmp_path / "m.csv")
    with pytest.raises(DiscoveryError, match="no such file"):
        discover(tmp_path / "nope")


def test_metadata_row_without_caption_follows_policy(sources, tmp_path):
    put(sources, "mp4", tmp_path / "a.mp4")
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4", "caption": ""}\n')
    with pytest.raises(DiscoveryError, match="no caption in m.jsonl:1"):
        discover(tmp_path)
    assert reasons(discover(tmp_path, missing_caption="skip").skipped)["a.mp4"] == "no caption in m.jsonl:1"


def test_sample_clips_are_discoverable(tmp_path):
    paths = synth.make_sample_clips(tmp_path / "samples")
    found = discover(tmp_path / "samples", probe_media=True)
    assert [i.path for i in found.items] == sorted(str(p) for p in paths)
    assert found.skipped == [] and found.notes == []
    assert any(i.info["height"] > i.info["width"] for i in found.items)  # a portrait clip
    assert {i.kind for i in found.items} == {"video", "image"}
