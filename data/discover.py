"""Find training media and their captions in a folder tree or a metadata file.

Media is recognised by content (magic bytes, then a PyAV probe), not by an extension list, so `.mts`,
`.m4v` or a misnamed file are found and a text file named `.mp4` is not. Every file that is not used is
returned in `skipped` with a reason: users lose trust when clips vanish silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av

from data.media import MediaError, probe

METADATA_SUFFIXES = (".jsonl", ".csv")
MISSING_POLICIES = ("error", "skip", "use_default")
MASK_SUFFIX = ".mask"  # NAME.mask.png / NAME.mask.mp4 next to NAME.mp4 is its loss mask, not a clip
# ISO-BMFF brands that are stills or audio rather than video.
_IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A "}


class DiscoveryError(ValueError):
    """The dataset description itself is wrong (malformed metadata, captions missing under policy 'error')."""


@dataclass
class Item:
    """One media file with its captions; JSON-serialisable via `dataclasses.asdict`."""

    path: str  # absolute
    kind: str  # "video" or "image", from the file's content
    captions: list[str]  # one or more; the trigger word already applied
    caption_source: str  # "sidecar", "metadata <file>:<line>" or "default"
    extra: dict = field(default_factory=dict)  # other metadata columns, as given
    info: dict | None = None  # media.MediaInfo as a dict, when discover(..., probe=True)
    mask: str | None = None  # loss mask: the metadata's `mask` column, else a NAME.mask.* file next to it


@dataclass
class Issue:
    """A file and what happened to it, for the user's report."""

    path: str
    reason: str
    caption_missing: bool = False  # about the media file's own caption (missing, empty, not UTF-8)


@dataclass
class Discovery:
    items: list[Item]  # usable media
    skipped: list[Issue]  # files not used, with why
    notes: list[Issue]  # files used but worth a word (e.g. a default caption)

    def to_dict(self) -> dict:
        return asdict(self)


def sniff(path: str | Path) -> str | None:
    """'video', 'image', 'audio' or None (not media), from the first bytes; PyAV decides the unknown."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) < 4:
        return None
    kind = _magic(head)
    if kind is not None:
        return kind
    if _plainly_not_media(head):
        return None  # skip PyAV, which may read megabytes of a large file while guessing its format
    try:
        with av.open(str(path)) as container:
            if any(not s.disposition & av.stream.Disposition.attached_pic for s in container.streams.video):
                return "video"
            return "audio" if container.streams.audio else None
    except Exception:  # any failure to open means "not media"
        return None


def _magic(head: bytes) -> str | None:
    if head.startswith((b"\x1aE\xdf\xa3", b"FLV", b"DKIF", b"YUV4MPEG2")):
        return "video"  # Matroska/WebM, Flash video, IVF, raw y4m
    if head[4:8] == b"ftyp":  # mp4, mov, m4v, 3gp, heic, avif, m4a
        brand = head[8:12]
        return "image" if brand in _IMAGE_BRANDS else "audio" if brand in _AUDIO_BRANDS else "video"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):  # QuickTime without ftyp
        return "video"
    if head.startswith(b"RIFF"):
        return {b"AVI ": "video", b"WEBP": "image", b"WAVE": "audio"}.get(head[8:12])
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")):
        return "video"  # MPEG program stream, MPEG-1/2 video, ASF/WMV
    if len(head) > 196 and (head[0] == head[188] == 0x47 or head[4] == head[196] == 0x47):
        return "video"  # MPEG-TS, and M2TS/.mts with its 4-byte prefix
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return "image"
    if (
        head.startswith(b"BM")
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 108, 124)
    ):
        return "image"
    if head.startswith((b"ID3", b"fLaC", b"\xff\xfb", b"\xff\xf3", b"\xff\xf1", b"\xff\xf9")):
        return "audio"
    return None  # includes Ogg, which holds video or audio: PyAV decides


def _plainly_not_media(head: bytes) -> bool:
    """Text, or a common non-media binary (zip, numpy, pickle, PDF, safetensors such as a latent cache)."""
    if head.startswith((b"PK\x03\x04", b"\x93NUMPY", b"\x80\x04", b"\x80\x05", b"%PDF")) or head[8:10] == b'{"':
        return True
    try:
        return b"\x00" not in head and bool(head.decode("utf-8"))
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end of the sample is still text
        return e.start >= len(head) - 3 and b"\x00" not in head


def read_captions(path: str | Path) -> list[str]:
    """Captions from a sidecar: one per non-empty line, UTF-8 BOM, CR/CRLF and surrounding space removed.

    Raises UnicodeDecodeError for a file that is not UTF-8.
    """
    text = Path(path).read_bytes().decode("utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def apply_trigger(caption: str, trigger: str | None) -> str:
    """Put the trigger word where the caption says `[trigger]`, else in front: 'trigger, caption'."""
    if not trigger:
        return caption
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger)
    return caption if caption.startswith(trigger) else f"{trigger}, {caption}"


def discover(
    root: str | Path,
    caption_ext: str = ".txt",
    missing_caption: str = "error",
    default_caption: str | None = None,
    trigger: str | None = None,
    probe_media: bool = False,
) -> Discovery:
    """Media and captions under `root` (a folder, searched recursively, or one .jsonl/.csv metadata file).

    Captions come from metadata files (.jsonl/.csv with `path` relative to the metadata file and `caption`,
    a string or a list) or else from a sidecar `<stem><caption_ext>` next to the media.
    missing_caption: what a media file without a usable caption gets: 'error' (one DiscoveryError listing
        every such file), 'skip' (reported in `skipped`) or 'use_default' (`default_caption`, reported in
        `notes`).
    A loss mask is the metadata's `mask` column (a path relative to the metadata file) or a `<stem>.mask.*`
    image or video next to the media; mask files are not media items.
    probe_media: also decode-check every file with media.probe; failures go to `skipped` with the reason.
    Hidden files and folders (name starting with '.') are not searched, and each is reported.
    """
    if missing_caption not in MISSING_POLICIES:
        raise ValueError(f"missing_caption must be one of {', '.join(MISSING_POLICIES)}; got {missing_caption!r}")
    if missing_caption == "use_default" and not (default_caption and default_caption.strip()):
        raise ValueError("missing_caption='use_default' needs a non-empty default_caption")
    root = Path(root).resolve()
    if not root.exists():
        raise DiscoveryError(f"{root}: no such file or folder")
    caption_ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
    found = Discovery([], [], [])
    missing: list[Issue] = []

    def add(path: Path, kind: str, captions: list[str], source: str, problem: str, extra: dict) -> None:
        captions = [c for c in captions if c]
        if not captions:
            if missing_caption == "skip":
                found.skipped.append(Issue(str(path), problem, caption_missing=True))
                return
            if missing_caption == "error":
                missing.append(Issue(str(path), problem))
                return
            captions, source = [default_caption.strip()], "default"
            found.notes.append(Issue(str(path), f"{problem}: default caption used"))
        found.items.append(Item(str(path), kind, [apply_trigger(c, trigger) for c in captions], source, extra))

    if root.is_file():
        if root.suffix.lower() not in METADATA_SUFFIXES:
            raise DiscoveryError(f"{root}: a single file must be .jsonl or .csv metadata")
        files, metadata = [], [root]
    else:
        files, metadata = _walk(root, found.skipped)
        metadata = [m for m in metadata if _is_metadata(m, found.skipped)]
    claimed: set[Path] = set()
    listed_masks: dict[Path, Path] = {}  # media -> mask, from metadata
    for meta in metadata:
        for line, row in _metadata_rows(meta):
            path, captions, extra = _parse_row(meta, line, row)
            claimed.add(path)
            if isinstance(extra.get("mask"), str) and extra["mask"].strip():
                listed_masks[path] = (meta.parent / extra.pop("mask").strip()).resolve()
                claimed.add(listed_masks[path])
            kind = sniff(path)
            if kind not in ("video", "image"):
                found.skipped.append(Issue(str(path), f"listed in {meta.name}:{line} but {_not_media(kind, path)}"))
                continue
            add(path, kind, captions, f"metadata {meta.name}:{line}", f"no caption in {meta.name}:{line}", extra)

    stems: set[tuple[Path, str]] = set()
    rejected: dict[tuple[Path, str], Issue] = {}  # files that are not media, by stem, for their caption files
    sidecars = []
    masks: dict[tuple[Path, str], Path] = {}  # (folder, media stem) -> NAME.mask.* file
    for path in files:
        if path.resolve() in claimed:
            continue
        if path.suffix.lower() == caption_ext.lower():
            sidecars.append(path)
            continue
        if path.stem.lower().endswith(MASK_SUFFIX):
            key = (path.parent, path.stem[: -len(MASK_SUFFIX)])
            if key in masks:
                found.skipped.append(Issue(str(path), f"another mask for {key[1]}.*: {masks[key].name} is used"))
            else:
                masks[key] = path
            continue
        kind = sniff(path)
        if kind not in ("video", "image"):
            found.skipped.append(Issue(str(path), _not_media(kind, path)))
            rejected.setdefault((path.parent, path.stem), found.skipped[-1])
            continue
        stems.add((path.parent, path.stem))
        sidecar = path.with_name(path.stem + caption_ext)
        captions, problem = [], f"no caption file {sidecar.name}"
        if sidecar.is_file():
            try:
                captions = read_captions(sidecar)
                problem = f"caption file {sidecar.name} is empty"
            except UnicodeDecodeError as e:
                problem = f"caption file {sidecar.name} is not UTF-8 ({e.reason} at byte {e.start})"
        add(path, kind, captions, "sidecar", problem, {})
    listed = {(p.parent, p.stem) for p in claimed}
    for path in sidecars:
        if (path.parent, path.stem) in listed:
            found.skipped.append(Issue(str(path), "caption file not used: a metadata file captions this media"))
        elif (path.parent, path.stem) in rejected:
            media = rejected[path.parent, path.stem]
            reason = f"caption file for {Path(media.path).name}, which is not used: {media.reason}"
            found.skipped.append(Issue(str(path), reason))
        elif (path.parent, path.stem) not in stems:
            found.skipped.append(Issue(str(path), f"caption file with no media file named {path.stem}.*"))

    for item in found.items:
        path = Path(item.path)
        mask = listed_masks.get(path) or masks.pop((path.parent, path.stem), None)
        item.mask = str(mask) if mask else None
    for (_, stem), mask in masks.items():
        found.skipped.append(Issue(str(mask), f"mask file, but no media file named {stem}.* is used"))

    if missing:
        listing = "\n".join(f"  {m.path}: {m.reason}" for m in missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        raise DiscoveryError(
            f"{len(missing)} media file(s) have no caption (missing_caption='error'; use 'skip' or "
            f"'use_default' to go on without them):\n{listing}{more}"
        )
    if probe_media:
        usable = []
        for item in found.items:
            try:
                item.info = asdict(probe(item.path))
                usable.append(item)
            except MediaError as e:
                found.skipped.append(Issue(item.path, e.reason))
        found.items = usable
    return found


def _not_media(kind: str | None, path: Path) -> str:
    if kind == "audio":
        return "audio only, no video"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return "not a media file (content is not a known video or image)"


def _walk(root: Path, skipped: list[Issue]) -> tuple[list[Path], list[Path]]:
    """All visible files under root in a stable order, and the metadata candidates among them."""
    files, metadata = [], []
    for folder, dirs, names in os.walk(root):
        for d in sorted(dirs):
            if d.startswith("."):
                skipped.append(Issue(str(Path(folder, d)), "hidden folder, not searched"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder, name)
            if name.startswith("."):
                skipped.append(Issue(str(path), "hidden file"))
            elif not path.is_file():
                skipped.append(Issue(str(path), "not a regular file (broken link?)"))
            elif path.suffix.lower() in METADATA_SUFFIXES:
                metadata.append(path)
            else:
                files.append(path)
    return files, metadata


def _is_metadata(path: Path, skipped: list[Issue]) -> bool:
    """A .csv with a `path` column or a .jsonl of JSON objects is metadata; any other is reported, not read."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
    except UnicodeDecodeError:
        skipped.append(Issue(str(path), "not UTF-8 text, so not read as metadata"))
        return False
    if path.suffix.lower() == ".csv":
        header = next(csv.reader([first]), [])
        ok = "path" in [h.strip() for h in header]
    else:
        ok = first.lstrip().startswith("{")
    if not ok:
        skipped.append(Issue(str(path), "not read as metadata (a .csv needs a 'path' column, a .jsonl JSON objects)"))
    return ok


def _metadata_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; malformed rows raise DiscoveryError naming file and line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DiscoveryError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    rows = []
    if path.suffix.lower() == ".jsonl":
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DiscoveryError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DiscoveryError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
            rows.append((line, row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    if "path" not in header:
        raise DiscoveryError(f"{path}:1: the header needs a 'path' column (has: {', '.join(header) or 'nothing'})")
    reader.fieldnames = header
    for row in reader:
        if None in row or None in row.values():
            raise DiscoveryError(f"{path}:{reader.line_num}: expected {len(header)} columns ({', '.join(header)})")
        rows.append((reader.line_num, row))
    return rows


def _parse_row(meta: Path, line: int, row: dict) -> tuple[Path, list[str], dict]:
    where = f"{meta}:{line}"
    raw_path = row.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise DiscoveryError(f"{where}: needs a 'path' string (keys: {', '.join(row) or 'none'})")
    path = (meta.parent / raw_path.strip()).resolve()
    if not path.is_file():
        raise DiscoveryError(f"{where}: {raw_path!r} does not exist (paths are relative to {meta.parent})")
    caption = row.get("caption")
    if caption is None:
        captions = []
    elif isinstance(caption, str):
        captions = [caption.strip()]
    elif isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        captions = [c.strip() for c in caption]
    else:
        raise DiscoveryError(f"{where}: 'caption' must be a string or a list of strings, got {caption!r}")
    extra = {k: v for k, v in row.items() if k not in ("path", "caption")}
    return path, captions, extra
