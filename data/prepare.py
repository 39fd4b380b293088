"""`vidlora prepare`: media + captions -> latent and text-embedding caches, an index and a report.

Three passes: plan (discover, probe, cut frame windows, pick buckets: cheap, and what the report shows),
then the VAE pass (clips decoded in worker processes while the VAE encodes), then the text pass (the VAE
is gone before the text encoder loads). Each entry is written atomically with a fingerprint, so a re-run
skips what is current and an interrupted run resumes. A bad file is reported with its reason and never
stops the run.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.buckets import bucket_sizes, choose_bucket, resize_crop
from data.cache import file_identity, fingerprint, read_meta, save_entry, write_json
from data.discover import Discovery, discover
from data.media import MediaError, probe, read_frames
from data.windows import source_windows
from trainer.config import DatasetSection, Recipe, UserError
from trainer.models import get_family
from trainer.models.base import DTYPES, ModelFamily

log = logging.getLogger("vidlora.prepare")


@dataclass
class Sample:
    """One training sample: a window of a clip at a bucket size, and where its cache entry lives."""

    file: str  # relative to the cache folder
    dataset: str
    source: str
    frames: list[int]  # source frame indices
    bucket: tuple[int, int]  # (width, height)
    captions: list[str]
    repeats: int
    fingerprint: str
    text_ids: list[str] = field(default_factory=list)


@dataclass
class Plan:
    samples: list[Sample]
    inputs: list[dict[str, Any]]  # one report row per input file


def model_identity(family: ModelFamily, component: str) -> dict[str, Any]:
    """What a cache entry depends on besides its input: the family and the component's weights."""
    ident: dict[str, Any] = {"family": family.name, "path": family.cfg.path, "revision": family.cfg.revision}
    folder = Path(family.cfg.path) / component
    if folder.is_dir():
        ident["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    return ident


def text_id(caption: str, te_ident: dict[str, Any], dtype: str) -> str:
    return fingerprint("text", caption, te_ident, dtype)[:24]


def _safe_stem(path: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(path).stem)[:60] or "clip"


def plan_dataset(ds: DatasetSection, family: ModelFamily, vae_ident: dict, cache_dtype: str) -> Plan:
    """Probe every input of one dataset, cut windows and pick buckets; nothing is decoded in full yet."""
    name = ds.name or Path(ds.path).stem or "data"
    found: Discovery = discover(ds.path, ds.caption_extension, ds.missing_caption, ds.default_caption, ds.trigger)
    inputs = [{"path": i.path, "dataset": name, "status": "skipped", "reason": i.reason} for i in found.skipped]
    inputs += [{"path": i.path, "dataset": name, "status": "note", "reason": i.reason} for i in found.notes]
    fps = None if ds.keep_source_fps else (ds.target_fps or family.native_fps)
    samples = []
    for item in tqdm(found.items, desc=f"probe {name}", unit="file", leave=False):
        row: dict[str, Any] = {"path": item.path, "dataset": name, "kind": item.kind, "captions": len(item.captions)}
        inputs.append(row)
        try:
            info = probe(item.path)
        except MediaError as e:
            row.update(status="failed", reason=e.reason)
            continue
        windows = source_windows(
            info.timestamps,
            ds.target_frames,
            ds.frame_window,
            fps,
            stride=ds.frame_stride,
            count=ds.window_count,
            max_frames=ds.max_frames,
        )
        source_id = file_identity(item.path)
        row.update(
            status="ok",
            width=info.width,
            height=info.height,
            frames=info.num_frames,
            fps=info.fps,
            backend=info.backend,
            samples=[],
        )
        if info.note:
            row["note"] = info.note
        for res in ds.resolutions:
            bucket = choose_bucket(info.width, info.height, bucket_sizes(res, max_ratio=ds.max_aspect_ratio))
            for window in windows:
                fp = fingerprint(source_id, window, bucket, vae_ident, cache_dtype)
                file = (
                    f"samples/{name}/{_safe_stem(item.path)}_{window[0]}+{len(window)}_{bucket[0]}x{bucket[1]}_{fp[:8]}"
                )
                samples.append(
                    Sample(f"{file}.safetensors", name, item.path, window, bucket, item.captions, ds.repeats, fp)
                )
                row["samples"].append(
                    {"file": samples[-1].file, "frames": [window[0], len(window)], "bucket": list(bucket)}
                )
    return Plan(samples, inputs)


class _Decode(Dataset):
    """Reads and resizes the frames of each sample; runs in DataLoader workers, errors become values."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        s = self.samples[i]
        try:
            frames = resize_crop(read_frames(s.source, s.frames), s.bucket)
            return i, torch.from_numpy(np.ascontiguousarray(frames))
        except Exception as e:  # a bad file must not stop the run: report it instead
            return i, f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def encode_latents(todo: list[Sample], family: ModelFamily, root: Path, recipe: Recipe, device: torch.device) -> dict:
    """VAE pass. Returns {sample file: error} for samples that could not be decoded."""
    errors: dict[str, str] = {}
    if not todo:
        return errors
    workers = recipe.data.decode_workers
    loader = iter(
        DataLoader(_Decode(todo), batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    )
    vae = family.load_vae(torch.float32 if device.type == "cpu" else torch.bfloat16).to(device).eval()
    if recipe.data.vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    dtype = DTYPES[recipe.data.cache_dtype]
    bar = tqdm(total=len(todo), desc="encode latents", unit="sample")
    with torch.no_grad():
        for i, frames in loader:
            s = todo[i]
            bar.update()
            if isinstance(frames, str):
                errors[s.file] = frames
                continue
            pixels = frames.permute(3, 0, 1, 2)[None].to(device, torch.float32) / 127.5 - 1
            encoded = family.encode_video(vae, pixels)
            meta = {
                "source": s.source,
                "dataset": s.dataset,
                "frames": s.frames,
                "bucket": s.bucket,
                "fingerprint": s.fingerprint,
                "family": family.name,
            }
            save_entry(root / s.file, {k: v[0].to(dtype) for k, v in encoded.items()}, meta)
    bar.close()
    del vae
    return errors


def encode_texts(
    captions: dict[str, str], family: ModelFamily, root: Path, recipe: Recipe, device: torch.device
) -> None:
    """Text pass: every caption (and validation prompt) not cached yet, in batches."""
    todo = {tid: c for tid, c in captions.items() if read_meta(root / "text" / f"{tid}.safetensors") is None}
    if not todo:
        return
    pipe = family.load_text_pipeline(torch.float32 if device.type == "cpu" else torch.bfloat16).to(device)
    dtype = DTYPES[recipe.data.cache_dtype]
    items = list(todo.items())
    with tqdm(total=len(items), desc="encode captions", unit="caption") as bar:
        for start in range(0, len(items), 16):
            chunk = items[start : start + 16]
            for (tid, caption), tensors in zip(chunk, family.encode_prompts(pipe, [c for _, c in chunk])):
                save_entry(
                    root / "text" / f"{tid}.safetensors",
                    {k: v.to(dtype) for k, v in tensors.items()},
                    {"caption": caption, "family": family.name},
                )
            bar.update(len(chunk))
    del pipe


def prepare(recipe: Recipe, strict: bool = False) -> int:
    """Run all passes; returns the process exit status (0 when something usable was prepared)."""
    started = time.time()
    family = get_family(recipe.model)
    root = Path(recipe.data.cache_dir)
    if not recipe.data.datasets:
        raise UserError("the recipe has no [[data.datasets]]: nothing to prepare")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae_ident, te_ident = model_identity(family, "vae"), model_identity(family, "text_encoder")
    samples, inputs = [], []
    for ds in recipe.data.datasets:
        p = plan_dataset(ds, family, vae_ident, recipe.data.cache_dtype)
        samples += p.samples
        inputs += p.inputs
    todo = [s for s in samples if (read_meta(root / s.file) or {}).get("fingerprint") != s.fingerprint]
    errors = encode_latents(todo, family, root, recipe, device)
    good = [s for s in samples if s.file not in errors]
    captions: dict[str, str] = {}
    for s in good:
        s.text_ids = [text_id(c, te_ident, recipe.data.cache_dtype) for c in s.captions]
        captions.update(zip(s.text_ids, s.captions))
    validation = {text_id(p, te_ident, recipe.data.cache_dtype): p for p in recipe.data.validation_prompts}
    negative = recipe.validation.negative_prompt  # validation videos use guidance: embed the negative too
    negative_id = text_id(negative, te_ident, recipe.data.cache_dtype) if validation else None
    encode_texts(
        {**captions, **validation, **({negative_id: negative} if negative_id else {})}, family, root, recipe, device
    )

    for row in inputs:  # a clip whose every window failed to decode is a failed input
        bad = [errors[x["file"]] for x in row.get("samples", []) if x["file"] in errors]
        if bad and len(bad) == len(row["samples"]):
            row.update(status="failed", reason=bad[0])
        elif bad:
            row["note"] = f"{len(bad)} of {len(row['samples'])} windows failed: {bad[0]}"
    index = {
        "format_version": 1,
        "family": family.name,
        "model": recipe.model.path,
        "samples": [{k: v for k, v in asdict(s).items() if k != "captions"} for s in good],
        "validation": list(validation),
        "validation_negative": negative_id,
    }
    write_json(root / "index.json", index)
    report = summarise(inputs, good, len(todo), time.time() - started)
    write_json(root / "report.json", report)
    print(format_summary(report, root))
    if not good:
        return 1
    return 1 if strict and report["counts"].get("failed", 0) + report["counts"].get("skipped", 0) else 0


def summarise(inputs: list[dict], good: list[Sample], encoded: int, seconds: float) -> dict:
    counts: dict[str, int] = {}
    for row in inputs:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    buckets: dict[str, int] = {}
    for s in good:
        key = f"{s.bucket[0]}x{s.bucket[1]}x{len(s.frames)}"
        buckets[key] = buckets.get(key, 0) + 1
    return {
        "counts": counts,
        "samples": len(good),
        "encoded_now": encoded,
        "buckets": buckets,
        "seconds": round(seconds, 2),
        "inputs": inputs,
    }


def format_summary(report: dict, root: Path) -> str:
    lines = [f"prepared {report['samples']} samples ({report['encoded_now']} encoded now) in {report['seconds']} s"]
    lines.append("inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(report["counts"].items())))
    lines.append("buckets (WxHxF): " + ", ".join(f"{k}: {v}" for k, v in sorted(report["buckets"].items())))
    for row in report["inputs"]:
        if row["status"] in ("failed", "skipped"):
            lines.append(f"  {row['status']}: {row['path']}: {row['reason']}")
    lines.append(f"cache: {root}  report: {root / 'report.json'}")
    return "\n".join(lines)


def load_index(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cache index; run `vidlora prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))
