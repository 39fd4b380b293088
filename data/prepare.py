"""`vidlora prepare`: media + captions -> latent and text-embedding caches, an index and a report.

Passes: the plan (data/plan.py: discover, probe, frame windows, buckets; cheap, and what the report shows),
the VAE pass (clips decoded in DataLoader worker processes while the VAE encodes batches of one shape), the
text pass (the VAE is gone before the text encoder loads), then index.json and report.json. Every entry is
written atomically with a fingerprint, so a re-run skips what is current, redoes what is stale, and a run
killed at any moment resumes. A bad file is reported with its reason and never stops the run.

Batches are fixed by the plan (runs of same-shape samples), not by what happens to be stale, because an
encoder's output changes in the last bits with its batch: so a resumed run, or one split over N
processes, writes exactly the entries a clean run writes. Under `accelerate launch` each process encodes
its share of the stale batches and the main process writes the index and the report.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.buckets import resize_crop
from data.cache import (
    DTYPES,
    FORMAT_VERSION,
    atomic_write,
    file_identity,
    fingerprint,
    read_meta,
    remove_temp_files,
    save_entry,
    write_json,
)
from data.media import MediaInfo, read_frames, read_image
from data.plan import Plan, ProbeCache, Sample, make_plan
from trainer.config import ModelSection, Recipe, UserError, ValidationSection

log = logging.getLogger("vidlora.prepare")

TEXT_BATCH = 16  # captions per text-encoder call
T = TypeVar("T")


class Encoders(Protocol):
    """What preparing a cache needs from a model family (trainer/models' `Encoders` is one): data/ knows no
    family, it is handed one."""

    name: str
    cfg: ModelSection
    native_fps: float
    vae_components: tuple[str, ...]
    text_components: tuple[str, ...]
    text_needs_image: bool

    def bucket_step(self) -> int: ...
    def check_shapes(self, shapes: Any, what: str) -> None: ...
    def load_vae(self, dtype: torch.dtype = ...) -> torch.nn.Module: ...
    def vae_module(self, loaded: torch.nn.Module) -> torch.nn.Module: ...
    def encode_video(self, vae: torch.nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def decode_video(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor: ...
    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor: ...
    def load_text_pipeline(self, dtype: torch.dtype = ...) -> Any: ...
    def encode_prompts(
        self, text_pipe: Any, prompts: list[str], images: list[np.ndarray] | None = None
    ) -> list[dict[str, torch.Tensor]]: ...


def model_identity(family: Encoders, components: tuple[str, ...]) -> dict[str, Any]:
    """What a cache entry depends on besides its input: the family and the weights of the components that
    made it (for a local folder, each file's size and mtime; for a hub id, the id and revision)."""
    ident: dict[str, Any] = {"family": family.name, "path": family.cfg.path, "revision": family.cfg.revision}
    for component in components:
        folder = Path(family.cfg.path) / component
        if folder.is_dir():
            ident[component] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    return ident


@dataclass(frozen=True)
class Picture:
    """The first frame a text entry is encoded with, for a family whose text encoder also reads it
    (`text_needs_image`): frame `frame` of `source` (a clip, a still or a validation image) resized and centre-cropped
    to `size` (width, height) as training frames are; without a source, the black picture the pipelines pair with
    the negative prompt."""

    source: str | None
    frame: int
    size: tuple[int, int]

    def key(self) -> str:
        """What the picture depends on: the file (path, size, mtime), the frame, the size and the decoder version."""
        source = file_identity(self.source) if self.source else None
        return fingerprint(FORMAT_VERSION, source, self.frame, list(self.size))

    def meta(self) -> dict[str, Any]:
        return {"source": self.source, "frame": self.frame, "size": list(self.size), "key": self.key()}

    def read(self, media: dict[str, MediaInfo]) -> np.ndarray:
        """uint8 [H, W, 3]: decoded as the VAE pass decodes a window (a clip's frame), or as `vidlora sample` reads an
        image (a validation image)."""
        width, height = self.size
        if self.source is None:
            return np.zeros((height, width, 3), np.uint8)
        if self.source in media:
            return resize_crop(read_frames(media[self.source], [self.frame]), self.size)[0]
        return read_image(self.source, self.size)


def text_id(caption: str, te_ident: dict[str, Any], dtype: str, picture: Picture | None = None) -> str:
    """A text entry's name: its caption (and first frame) under the text encoders that make it."""
    return fingerprint("text", caption, te_ident, dtype, *([picture.key()] if picture else []))[:24]


def validation_size(v: ValidationSection, training: list[dict[str, Any]]) -> tuple[int, int]:
    """(width, height) of validation videos: validation.width/height, else the bucket of the first training sample
    (index entries not held out). Image-conditioned prompts are encoded at this size."""
    width, height = training[0]["bucket"]
    return v.width or width, v.height or height


def validation_pictures(recipe: Recipe, family: Encoders, good: list[Sample]) -> tuple[list[Picture], Picture]:
    """The pictures a family whose text encoder reads the first frame encodes the validation prompts with
    (validation.images at the validation size, read now so a bad one stops prepare before encoding) and the
    negative prompt with (black, as the pipelines do)."""
    from data.dataset import holdout_sources  # that module reads this one's index

    prompts, images = recipe.data.validation_prompts, recipe.validation.images
    if len(images) not in (1, len(prompts)):
        raise UserError(
            f"validation.images: the {family.name} text encoder reads each validation prompt with its first frame; "
            f"give one image, or one per validation prompt ({len(prompts)}), or no data.validation_prompts"
        )
    samples = [_index_entry(s) for s in good]
    held = holdout_sources(samples, recipe.validation.holdout_clips) if recipe.validation.holdout_clips else set()
    size = validation_size(recipe.validation, [s for s in samples if s["source"] not in held] or samples)
    pictures = [Picture(images[i % len(images)], 0, size) for i in range(len(prompts))]
    for picture in dict.fromkeys(pictures):
        picture.read({})
    return pictures, Picture(None, 0, size)


def fixed_batches(items: list[T], key: Callable[[T], Hashable], size: int) -> list[list[T]]:
    """Items grouped by `key` (groups in order of first appearance), each group cut into chunks of `size`."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


class _Decode(Dataset):
    """Reads and resizes the frames of each sample; runs in DataLoader workers, errors become values."""

    def __init__(self, samples: list[Sample], media: dict[str, MediaInfo]):
        self.samples, self.media = samples, media

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str, torch.Tensor | None]:
        s = self.samples[i]
        try:
            frames = resize_crop(read_frames(self.media[s.source], s.frames), s.bucket)
            return i, torch.from_numpy(np.ascontiguousarray(frames)), self.mask(s)
        except Exception as e:  # a bad file must not stop the run: report it instead
            return i, f"{type(e).__name__}: {getattr(e, 'reason', e)}", None

    def mask(self, s: Sample) -> torch.Tensor | None:
        """The sample's loss mask [F, H, W] in [0, 1], cut and resized exactly as its frames (a still: every frame)."""
        if s.mask is None:
            return None
        info = self.media[s.mask]
        pixels = resize_crop(read_frames(info, s.frames if info.kind == "video" else [0]), s.bucket)
        mask = torch.from_numpy(np.ascontiguousarray(pixels)).float().mean(-1).div(255).clamp(0, 1)
        return mask.expand(len(s.frames), -1, -1)


def entry_meta(s: Sample, family: Encoders) -> dict[str, Any]:
    """What a latent entry says about itself: enough to trace it back to its source frames."""
    return {
        "source": s.source,
        "dataset": s.dataset,
        "frames": s.frames,
        "bucket": list(s.bucket),
        "fps": s.fps,
        "fingerprint": s.fingerprint,
        "family": family.name,
    }


def encode_latents(
    batches: list[list[Sample]],
    media: dict[str, MediaInfo],
    stale: set[str],
    family: Encoders,
    root: Path,
    recipe: Recipe,
    device: torch.device,
    vae_dtype: torch.dtype,
    show_progress: bool = True,
) -> tuple[dict[str, str], int]:
    """VAE pass over `batches` (each one shape); writes the entries in `stale`.

    Returns ({sample file: why it could not be decoded}, entries written).
    """
    flat = [s for batch in batches for s in batch]
    errors: dict[str, str] = {}
    if not flat:
        return errors, 0
    workers = min(recipe.data.decode_workers, cpu_cores())  # more than the cores only contend (torch warns)
    # Workers start (fork) before the VAE loads, so they never hold a copy of it.
    decoded = iter(
        DataLoader(_Decode(flat, media), batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    )
    vae = family.load_vae(vae_dtype).to(device).eval()
    if recipe.data.vae_tiling:
        vae.enable_tiling()  # diffusers tiles only frames larger than the VAE's tile size
    dtype = DTYPES[recipe.data.cache_dtype]
    written = 0
    bar = tqdm(total=len(flat), desc="encode latents", unit="sample", disable=not show_progress, smoothing=0.05)
    with torch.no_grad():
        for batch in batches:
            good = []
            for s in batch:
                _, frames, mask = next(decoded)
                if isinstance(frames, str):
                    errors[s.file] = frames
                else:
                    good.append((s, frames, mask))
            if good:
                pixels = torch.stack([f for _, f, _ in good]).to(device, non_blocking=True)
                pixels = pixels.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B,F,H,W,3] uint8 -> [B,3,F,H,W]
                try:
                    encoded = family.encode_video(vae, pixels)
                except torch.cuda.OutOfMemoryError as e:
                    w, h, f = batch[0].shape
                    raise UserError(
                        f"the VAE ran out of memory on {len(good)} samples of {w}x{h}x{f}: lower "
                        f"data.encode_batch_size (now {recipe.data.encode_batch_size}) or set data.vae_tiling = "
                        "true; entries written so far are kept, so a re-run resumes"
                    ) from e
                for k, (s, _, mask) in enumerate(good):
                    if s.file in stale:  # members already current keep their file (and mtime)
                        tensors = {n: v[k].to(dtype) for n, v in encoded.items()}
                        if mask is not None:  # on the latent grid: [1, f, h, w]
                            tensors["mask"] = family.latent_mask(mask).to(dtype)
                            assert tensors["mask"].shape[1:] == tensors["latents"].shape[1:], s.file
                        save_entry(root / s.file, tensors, entry_meta(s, family))
                        written += 1
            bar.update(len(batch))
            bar.set_postfix_str("x".join(map(str, batch[0].shape)), refresh=False)
    bar.close()
    del vae, decoded
    _free(device)
    return errors, written


def encode_texts(
    chunks: list[list[str]],
    stale: set[str],
    jobs: dict[str, tuple[str, Picture | None]],
    media: dict[str, MediaInfo],
    family: Encoders,
    root: Path,
    recipe: Recipe,
    device: torch.device,
    show_progress: bool = True,
) -> int:
    """Text pass over `chunks` of text ids (each the id of a caption and, for a family whose text encoder reads the
    first frame, its picture); writes the entries in `stale`. Returns how many were written."""
    if not chunks:
        return 0
    pipe = family.load_text_pipeline(torch.float32 if device.type == "cpu" else torch.bfloat16).to(device)
    dtype = DTYPES[recipe.data.cache_dtype]
    written = 0
    with tqdm(total=sum(map(len, chunks)), desc="encode captions", unit="caption", disable=not show_progress) as bar:
        for chunk in chunks:
            prompts = [jobs[t][0] for t in chunk]
            if family.text_needs_image:
                encoded = family.encode_prompts(pipe, prompts, [jobs[t][1].read(media) for t in chunk])
            else:
                encoded = family.encode_prompts(pipe, prompts)
            for tid, tensors in zip(chunk, encoded):
                if tid in stale:
                    caption, picture = jobs[tid]
                    meta = {"caption": caption, "family": family.name}
                    meta |= {"image": picture.meta()} if picture else {}
                    save_entry(root / "text" / f"{tid}.safetensors", {k: v.to(dtype) for k, v in tensors.items()}, meta)
                    written += 1
            bar.update(len(chunk))
    del pipe
    _free(device)
    return written


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free(device: torch.device) -> None:
    """Hand a finished pass's GPU memory back before the next model loads."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(recipe: Recipe, family: Encoders, strict: bool = False, dry_run: bool = False, prune: bool = False) -> int:
    """Run all passes with `family`'s encoders; returns the process exit status (0 when something usable was prepared).

    dry_run: plan and report only (every input, its windows and buckets), no encoding and no index.
    prune: delete cache entries this plan no longer makes (only vidlora entries, only in this cache).
    """
    started = time.time()
    if not recipe.data.datasets:
        raise UserError("the recipe has no [[data.datasets]]: nothing to prepare")
    # `accelerate launch --cpu` (or ACCELERATE_USE_CPU) keeps every process on the CPU; PartialState, unlike
    # the Accelerator, does not read that flag itself.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    main, rank, world = state.is_main_process, state.process_index, state.num_processes
    root = Path(recipe.data.cache_dir)
    device = state.device
    vae_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    identity = {  # everything besides the input that changes what the VAE writes
        "format": FORMAT_VERSION,
        "vae": model_identity(family, family.vae_components),
        "vae_dtype": str(vae_dtype),
        "vae_tiling": recipe.data.vae_tiling,
        "cache_dtype": recipe.data.cache_dtype,
    }
    te_ident = {**model_identity(family, family.text_components), "dtype": "fp32" if device.type == "cpu" else "bf16"}

    with state.main_process_first():  # the main process probes; the others then find its probe cache
        probes = ProbeCache(root / "probes.json")
        plan = make_plan(
            recipe.data.datasets,
            family.native_fps,
            identity,
            probes,
            show_progress=main,
            bucket_step=family.bucket_step(),
        )
        if main:
            probes.save()
            for folder, recursive in ((root, False), (root / "samples", True), (root / "text", False)):
                remove_temp_files(folder, recursive)  # left by a run killed mid-write
            _write_manifest(plan, root / "manifest.jsonl")
    family.check_shapes((s.shape for s in plan.samples), "bucket")
    if family.text_needs_image and recipe.data.validation_prompts and plan.samples:
        validation_pictures(recipe, family, plan.samples)  # a missing or bad validation image stops us before encoding
    if dry_run:
        report = summarise(plan, plan.samples, {}, 0, 0, time.time() - started, dry_run=True)
        if main:
            write_json(root / "report.json", report)
            print(format_summary(report, root))
        return exit_status(report, strict)

    # Latents: fixed batches, the stale ones shared out over the processes.
    samples = plan.samples
    stale = {s.file for s in samples if (read_meta(root / s.file) or {}).get("fingerprint") != s.fingerprint}
    todo = [b for b in fixed_batches(samples, lambda s: s.shape, recipe.data.encode_batch_size) if stale & _files(b)]
    state.wait_for_everyone()  # every process has seen the cache as it was before anyone writes to it
    mine = todo[rank::world]
    errors, written = encode_latents(mine, plan.media, stale, family, root, recipe, device, vae_dtype, main)
    shares = gather_object([(errors, written)])
    errors = {k: v for share_errors, _ in shares for k, v in share_errors.items()}
    per_process = [n for _, n in shares]

    # Texts: every caption of every good sample, and the validation prompts, in fixed chunks too. A family whose
    # text encoder reads the first frame makes one entry per (caption, first frame).
    good = [s for s in samples if s.file not in errors]
    dtype = recipe.data.cache_dtype
    jobs: dict[str, tuple[str, Picture | None]] = {}  # text id -> (caption, picture)
    for s in good:
        picture = Picture(s.source, s.frames[0], s.bucket) if family.text_needs_image else None
        s.text_ids = [text_id(c, te_ident, dtype, picture) for c in s.captions]
        jobs.update((t, (c, picture)) for t, c in zip(s.text_ids, s.captions))
        if recipe.train.caption_dropout:  # one entry, or one per first frame when the text encoder reads it
            s.empty_text_id = text_id("", te_ident, dtype, picture)
            jobs[s.empty_text_id] = ("", picture)
    prompts = recipe.data.validation_prompts if good or not family.text_needs_image else []
    pictures, negative_picture = ([None] * len(prompts), None)
    if family.text_needs_image and prompts:
        pictures, negative_picture = validation_pictures(recipe, family, good)
    validation = {text_id(p, te_ident, dtype, pic): (p, pic) for p, pic in zip(prompts, pictures)}
    negative = recipe.validation.negative_prompt  # validation videos use guidance: embed the negative too
    negative_id = text_id(negative, te_ident, dtype, negative_picture) if validation else None
    jobs.update(validation)
    if negative_id:
        jobs[negative_id] = (negative, negative_picture)
    ids = sorted(jobs)
    text_stale = {t for t in ids if read_meta(root / "text" / f"{t}.safetensors") is None}
    chunks = [ids[i : i + TEXT_BATCH] for i in range(0, len(ids), TEXT_BATCH)]
    chunks = [c for c in chunks if text_stale.intersection(c)]
    state.wait_for_everyone()
    texts = encode_texts(chunks[rank::world], text_stale, jobs, plan.media, family, root, recipe, device, main)
    texts = sum(gather_object([texts]))  # also the barrier: every entry is written after this

    report = summarise(plan, good, errors, sum(per_process), texts, time.time() - started)
    report["encoded_per_process"] = per_process
    if main:
        index = {
            "format_version": FORMAT_VERSION,
            "family": family.name,
            "model": recipe.model.path,
            "model_revision": recipe.model.revision,
            "samples": [_index_entry(s) for s in good],
            "validation": list(validation),
            "validation_negative": negative_id,
        }
        write_json(root / "index.json", index, only_if_changed=True)
        orphans = orphan_entries(root, {s.file for s in samples}, set(ids))
        if prune:
            for path in orphans:
                path.unlink()
            report["pruned"] = len(orphans)
        else:
            report["orphans"] = [str(p.relative_to(root)) for p in orphans]
        write_json(root / "report.json", report)
        print(format_summary(report, root))
    return exit_status(report, strict)


def exit_status(report: dict[str, Any], strict: bool) -> int:
    """0 when anything was prepared; 1 when nothing was, or with `strict` when any input was not used."""
    if not report["samples"]:
        return 1
    return 1 if strict and (report["counts"].get("failed", 0) or report["counts"].get("skipped", 0)) else 0


def _files(batch: list[Sample]) -> set[str]:
    return {s.file for s in batch}


def _index_entry(s: Sample) -> dict[str, Any]:
    return {
        "file": s.file,
        "dataset": s.dataset,
        "source": s.source,
        "frames": s.frames,
        "bucket": list(s.bucket),
        "fps": s.fps,
        "repeats": s.repeats,
        "fingerprint": s.fingerprint,
        "text_ids": s.text_ids,
        **({"empty_text_id": s.empty_text_id} if s.empty_text_id else {}),
        **({"mask": s.mask} if s.mask else {}),
    }


def _write_manifest(plan: Plan, path: Path) -> None:
    """The discovered items as JSON lines (`datasets.load_dataset("json", data_files=...)` reads it back)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not len(plan.manifest):
        return
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        atomic_write(path, lambda tmp: plan.manifest.to_json(tmp, lines=True, force_ascii=False), only_if_changed=True)
    finally:
        if not was_disabled:
            enable_progress_bars()


def orphan_entries(root: Path, sample_files: set[str], text_ids: set[str]) -> list[Path]:
    """vidlora entries in this cache that the current plan does not make (other settings, removed clips)."""
    planned = sample_files | {f"text/{t}.safetensors" for t in text_ids}
    found = [*root.glob("samples/**/*.safetensors"), *root.glob("text/*.safetensors")]
    return sorted(p for p in found if p.relative_to(root).as_posix() not in planned and read_meta(p) is not None)


def summarise(
    plan: Plan,
    good: list[Sample],
    errors: dict[str, str],
    encoded: int,
    texts: int,
    seconds: float,
    dry_run: bool = False,
) -> dict[str, Any]:
    """report.json: counts, buckets, and one row per input with its status, samples and reasons."""
    rows = []
    for row in plan.inputs:
        row = dict(row)
        planned = row.pop("samples", [])
        made = [x for x in planned if x["file"] not in errors]
        bad = [errors[x["file"]] for x in planned if x["file"] in errors]
        if planned and not made:
            row.update(status="failed", reason=bad[0])
        elif bad:
            row["note"] = "; ".join(
                filter(None, [row.get("note"), f"{len(bad)} of {len(planned)} windows failed: {bad[0]}"])
            )
        if row["status"] == "ok":
            row["samples"] = len(made)
            row["buckets"] = sorted({f"{x['bucket'][0]}x{x['bucket'][1]}" for x in made})
            spans = sorted({(x["start"], x["frames"], *x["source"]) for x in made})
            row["windows"] = [[start, frames] for start, frames, _, _ in spans]  # in resampled frames
            row["source_frames"] = [[first, last] for _, _, first, last in spans]
        rows.append(row)
    counts: dict[str, int] = {}
    for status, _ in {(row["status"], row["path"]): None for row in rows}:  # a file in two datasets counts once
        counts[status] = counts.get(status, 0) + 1
    buckets: dict[str, int] = {}
    for s in good:
        key = "x".join(map(str, s.shape))
        buckets[key] = buckets.get(key, 0) + 1
    report = {
        "dry_run": dry_run,
        "counts": counts,
        "samples": len(good),
        "encoded_now": encoded,
        "texts_encoded_now": texts,
        "buckets": dict(sorted(buckets.items())),
        "seconds": round(seconds, 2),
        "inputs": rows,
    }
    return json.loads(json.dumps(report))  # tuples -> lists, as the file will hold them


def format_summary(report: dict[str, Any], root: Path, max_lines: int = 40) -> str:
    """The console summary: what was made, and every input that was not used, with why."""
    verb = "would prepare" if report["dry_run"] else "prepared"
    lines = [f"{verb} {report['samples']} samples ({report['encoded_now']} latents and "]
    lines[0] += f"{report['texts_encoded_now']} captions encoded now) in {report['seconds']} s"
    lines.append("inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(report["counts"].items())))
    lines.append("buckets (WxHxF): " + ", ".join(f"{k}: {v}" for k, v in report["buckets"].items()))
    problems = _once([r for r in report["inputs"] if r["status"] in ("failed", "skipped")], "reason")
    for row in problems[:max_lines]:
        lines.append(f"  {row['status']}: {row['path']}: {row['reason']}")
    if len(problems) > max_lines:
        lines.append(f"  ... and {len(problems) - max_lines} more in report.json")
    still = _once([r for r in report["inputs"] if r.get("no_motion") and r["status"] == "ok"], "no_motion")
    if still:
        lines.append(f"no multi-frame sample from {len(still)} video(s) (too short; each trains as a still):")
        lines += [f"  {row['path']}: {row['no_motion']}" for row in still[:10]]
        lines += [f"  ... and {len(still) - 10} more in report.json (`no_motion`)"] if len(still) > 10 else []
    unmasked = _once([r for r in report["inputs"] if r.get("mask_missing") and r["status"] == "ok"], "note")
    if unmasked:
        lines.append(f"no mask for {len(unmasked)} file(s) of datasets with masks (the whole frame counts):")
        lines += [f"  {row['path']}" for row in unmasked[:10]]
        lines += [f"  ... and {len(unmasked) - 10} more in report.json (`mask_missing`)"] if len(unmasked) > 10 else []
    converted = _once([r for r in report["inputs"] if r.get("color")], "color")
    if converted:
        lines.append(f"converted to BT.709 SDR: {len(converted)} HDR or wide-gamut video(s) (`color` in report.json):")
        lines += [f"  {row['path']}: {row['color']}" for row in converted[:10]]
        lines += [f"  ... and {len(converted) - 10} more in report.json"] if len(converted) > 10 else []
    if report.get("orphans"):
        lines.append(f"{len(report['orphans'])} cache entries are not part of this plan (`--prune` deletes them)")
    if report.get("pruned"):
        lines.append(f"pruned {report['pruned']} cache entries that are not part of this plan")
    lines.append(f"cache: {root}  report: {root / 'report.json'}")
    lines.append(f"see it: vidlora report {shlex.quote(str(root))}")
    return "\n".join(lines)


def _once(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One row per (file, status, `key`): a folder used by two datasets is listed once, not twice."""
    return list({(r["path"], r["status"], r[key]): r for r in rows}.values())


def load_index(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cache index; run `vidlora prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))
