"""What `prepare` will make, worked out before anything is decoded in full.

Discovery finds media and captions per dataset; the manifest (a `datasets.Dataset`, one row per usable
file) carries each file with its dataset's settings; probing counts the frames that really decode (cached
by file identity, so a re-run probes nothing); then frame windows and buckets give the samples. Each
sample knows its cache file and the fingerprint its entry must carry to be current. Every input gets a
report row, so nothing disappears without a reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm

from data.buckets import bucket_sizes, choose_bucket
from data.cache import file_identity, fingerprint, write_json
from data.discover import discover
from data.media import MediaError, MediaInfo, NotVideoError, probe
from data.windows import frame_windows, resample
from trainer.config import DatasetSection, RecipeError

PROBE_VERSION = 2  # bump when probe() changes what it reports, so cached probes are redone


@dataclass
class Sample:
    """One training sample: a window of a clip at a bucket size, and where its cache entry lives."""

    file: str  # relative to the cache folder
    dataset: str
    source: str
    frames: list[int]  # source frame indices, in order
    bucket: tuple[int, int]  # (width, height)
    fps: float  # frame rate of the window (0.0 for a still)
    captions: list[str]
    repeats: int
    fingerprint: str
    text_ids: list[str] = field(default_factory=list)
    empty_text_id: str | None = None  # the empty prompt's entry (for train.caption_dropout)
    mask: str | None = None  # loss mask file (image or video of the clip's size and length)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(width, height, frames): samples with equal shapes have equal latent shapes."""
        return (*self.bucket, len(self.frames))


@dataclass
class Plan:
    samples: list[Sample]
    inputs: list[dict[str, Any]]  # one report row per input file, in discovery order
    manifest: Dataset  # one row per usable media file: dataset, path, kind, captions, extra (JSON)
    media: dict[str, MediaInfo]  # probe of every usable source, so decoding never probes again


class ProbeCache:
    """`media.probe` results (or the failure) per file identity (path, size, mtime), kept in the cache folder.

    Probing a long clip demuxes all of it; with this a re-run that has nothing to do reads one JSON file.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known: dict[str, dict] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.known = {}
        self.used: dict[str, dict] = {}

    def probe(self, file: str) -> MediaInfo:
        key = fingerprint(PROBE_VERSION, file_identity(file))
        hit = self.known.get(key)
        if hit is None:
            try:
                hit = {"info": asdict(probe(file))}
            except MediaError as e:
                hit = {"error": e.reason, "not_video": isinstance(e, NotVideoError)}
        self.used[key] = hit
        if "error" in hit:
            raise (NotVideoError if hit.get("not_video") else MediaError)(file, hit["error"])
        return MediaInfo.from_dict(hit["info"])

    def save(self) -> None:
        """Keep what this run used (files gone or changed drop out); written only when it changed."""
        if self.used != self.known:
            write_json(self.path, self.used)


def dataset_names(datasets: list[DatasetSection]) -> list[str]:
    """A unique, file-name-safe name per dataset: its `name`, else its folder/file name (+ _2, _3 ...)."""
    names: list[str] = []
    explicit = [d.name for d in datasets if d.name]
    dupes = {n for n in explicit if explicit.count(n) > 1}
    if dupes:
        raise RecipeError(f"data.datasets: the name {sorted(dupes)[0]!r} is used twice; names must be unique")
    for d in datasets:
        base = _safe(d.name or Path(d.path).stem or "data")
        name, k = base, 1
        while name in names or (name in explicit and not d.name):
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def build_manifest(datasets: list[DatasetSection], names: list[str]) -> tuple[Dataset, list[dict[str, Any]]]:
    """Discover every dataset; usable files become manifest rows, everything else a report row with a reason."""
    rows, unused = [], []
    for name, ds in zip(names, datasets):
        found = discover(ds.path, ds.caption_extension, ds.missing_caption, ds.default_caption, ds.trigger)
        notes = {n.path: n.reason for n in found.notes}
        for i in found.skipped:
            unused.append({"path": i.path, "dataset": name, "status": "skipped", "reason": i.reason})
            if i.caption_missing:
                unused[-1]["caption_missing"] = True
        for item in found.items:
            rows.append(
                {
                    "dataset": name,
                    "path": item.path,
                    "kind": item.kind,
                    "captions": item.captions,
                    "caption_source": item.caption_source,
                    "note": notes.get(item.path, ""),
                    "extra": json.dumps(item.extra, ensure_ascii=False, sort_keys=True),  # free-form columns
                    "mask": item.mask or "",
                }
            )
    return Dataset.from_list(rows), unused


def make_plan(
    datasets: list[DatasetSection],
    default_fps: float,
    identity: dict[str, Any],
    probes: ProbeCache,
    show_progress: bool = True,
    bucket_step: int = 16,
) -> Plan:
    """Probe every usable file, cut windows and pick buckets (sides multiples of the model's `bucket_step`);
    `identity` (model, VAE, encode settings) goes into every fingerprint, so changing any of it makes the entries
    stale."""
    names = dataset_names(datasets)
    manifest, unused = build_manifest(datasets, names)
    settings = dict(zip(names, datasets))
    samples: list[Sample] = []
    inputs: list[dict[str, Any]] = []
    media: dict[str, MediaInfo] = {}
    masked = {d for d, m in zip(manifest["dataset"], manifest["mask"]) if m} if len(manifest) else set()
    for item in tqdm(manifest, desc="probe", unit="file", disable=not show_progress or len(manifest) < 2):
        ds = settings[item["dataset"]]
        row: dict[str, Any] = {"path": item["path"], "dataset": item["dataset"], "kind": item["kind"]}
        row["captions"] = len(item["captions"])
        if item["note"]:
            row["note"] = item["note"]
        if item["caption_source"] == "default":
            row["caption_missing"] = True
        inputs.append(row)
        try:
            info = probes.probe(item["path"])
        except MediaError as e:  # a file with no picture is skipped like other non-video files
            row.update(status="skipped" if isinstance(e, NotVideoError) else "failed", reason=e.reason)
            continue
        media[item["path"]] = info
        mask = item["mask"] or None
        if mask:
            mask_info, problem = check_mask(mask, info, probes)
            if problem:
                row.update(status="failed", reason=problem, mask=mask)
                continue
            media[mask] = mask_info
            row["mask"] = mask
        elif item["dataset"] in masked:  # its dataset has masks: this file's was forgotten, or misnamed
            row["mask_missing"] = True
            row["note"] = "; ".join(filter(None, [row.get("note"), "no mask file: the whole frame counts"]))
        fps = None if ds.keep_source_fps or info.kind == "image" else (ds.target_fps or default_fps)
        order = resample(info.timestamps, fps)  # resampled frame -> source frame
        options = {"stride": ds.frame_stride, "count": ds.window_count, "max_frames": ds.max_frames}
        windows = frame_windows(len(order), ds.target_frames, ds.frame_window, **options)
        row.update(status="ok", width=info.width, height=info.height, frames=info.num_frames, fps=round(info.fps, 3))
        row.update(rotation=info.rotation, codec=info.codec, backend=info.backend, samples=[])
        if info.note:
            row["note"] = "; ".join(filter(None, [row.get("note"), info.note]))
        if info.transfer or info.gamut:
            row["color"] = color_conversion(info)
        wants_motion = ds.max_frames >= 5 if ds.frame_window == "full" else max(ds.target_frames) > 1
        if info.kind == "video" and wants_motion and all(len(w) == 1 for w in windows):
            rate = f"{fps or info.fps:.5g} fps"
            row["no_motion"] = f"{len(order)} frame{'s' * (len(order) > 1)} at {rate}; the shortest window is 5"
        source = file_identity(item["path"])
        buckets = [
            choose_bucket(info.width, info.height, bucket_sizes(r, max_ratio=ds.max_aspect_ratio, step=bucket_step))
            for r in ds.resolutions
        ]
        for bucket in dict.fromkeys(buckets):  # two resolutions may give one bucket: one sample, not two
            for resampled in windows:
                window = [order[i] for i in resampled]
                key = fingerprint(source["path"], window, bucket)
                file = f"samples/{item['dataset']}/{_safe(Path(item['path']).stem)}_{window[0]}+{len(window)}"
                file += f"_{bucket[0]}x{bucket[1]}_{key[:8]}.safetensors"
                sample = Sample(
                    file=file,
                    dataset=item["dataset"],
                    source=item["path"],
                    frames=window,
                    bucket=bucket,
                    fps=float(fps or info.fps),
                    captions=item["captions"],
                    repeats=ds.repeats,
                    fingerprint=fingerprint(source, window, bucket, identity, *([file_identity(mask)] if mask else [])),
                    mask=mask,
                )
                samples.append(sample)
                span = {"start": resampled[0], "frames": len(window), "source": [window[0], window[-1]]}
                row["samples"].append({"file": file, **span, "bucket": list(bucket)})
    return Plan(samples, inputs + unused, manifest, media)


def check_mask(mask: str, clip: MediaInfo, probes: ProbeCache) -> tuple[MediaInfo | None, str | None]:
    """(the mask's probe, why it cannot mask this clip or None): it must decode and have the clip's size, and be a
    still (one mask for every frame) or a video of the clip's length (windowed with it)."""
    if not Path(mask).is_file():
        return None, f"mask {mask}: no such file"
    try:
        info = probes.probe(mask)
    except MediaError as e:
        return None, f"mask {mask}: {e.reason}"
    if (info.width, info.height) != (clip.width, clip.height):
        return info, f"mask {mask} is {info.width}x{info.height}, the clip {clip.width}x{clip.height}"
    if info.kind == "video" and info.num_frames != clip.num_frames:
        return info, f"mask {mask} has {info.num_frames} frames, the clip {clip.num_frames}"
    return info, None


def color_conversion(info: MediaInfo) -> str:
    """What decoding does to an HDR or wide-gamut clip, in words, e.g. 'HDR PQ, BT.2020: tone-mapped to SDR'."""
    source = [f"HDR {info.transfer.upper()}"] if info.transfer else []
    source += ["BT.2020"] if info.gamut == "bt2020" else []
    return f"{', '.join(source)}: {'tone-mapped' if info.transfer else 'converted'} to BT.709 SDR"


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)[:60].strip("._") or "clip"
