"""`vidlora inspect CACHE_DIR`: what a prepared cache holds, and what the model will actually see.

Counts per dataset, bucket and length, the total duration, a health check of every entry, and on request
a few samples decoded back to video with the family's VAE, so a wrong crop, rotation or frame rate shows
before hours of training.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.cache import load_entry, read_meta
from data.prepare import Encoders, load_index


def inspect_cache(
    cache_dir: str | Path, decode: int = 0, out_dir: str | Path | None = None, family: Encoders | None = None
) -> str:
    """A readable summary of the cache; with `decode` > 0 also writes that many samples, decoded by `family`'s VAE,
    as .mp4 (.png for 1-frame samples) into `out_dir` (default CACHE_DIR/inspect), one per bucket shape first."""
    root = Path(cache_dir)
    index = load_index(root)
    samples = index["samples"]
    texts = {t for s in samples for t in s["text_ids"]}
    lines = [
        f"cache {root}: {len(samples)} samples ({sum(s['repeats'] for s in samples)} per epoch with repeats), "
        f"family {index['family']}, model {index['model']}",
        f"captions: {len(texts)} cached, {len(index.get('validation', []))} validation prompts",
    ]
    seconds = sum(len(s["frames"]) / s["fps"] for s in samples if s.get("fps") and len(s["frames"]) > 1)
    stills = sum(1 for s in samples if len(s["frames"]) == 1)
    lines.append(
        f"duration: {seconds:.1f} s of video in {len(samples) - stills} clip samples, and {stills} samples of 1 frame"
    )
    lines.append("by dataset:")
    for name, count in Counter(s["dataset"] for s in samples).items():
        of = [s for s in samples if s["dataset"] == name]
        lines.append(
            f"  {name}: {count} samples x {of[0]['repeats']} repeats, from {len({s['source'] for s in of})} files"
        )
    lines.append("by bucket (WxH x frames):")
    shapes = Counter(_shape(s) for s in samples)
    lines += [f"  {w}x{h} x {f}: {n}" for (w, h, f), n in sorted(shapes.items())]
    lengths = Counter(len(s["frames"]) for s in samples)
    lines.append("by frames: " + ", ".join(f"{f}: {n}" for f, n in sorted(lengths.items())))
    lines.append(_health(root, samples, texts))
    if decode > 0:
        if family is None:
            raise ValueError("decoding samples needs the family that made the cache")
        lines += [f"decoded: {p}" for p in decode_samples(root, index, decode, out_dir, family)]
    return "\n".join(lines)


def _shape(s: dict[str, Any]) -> tuple[int, int, int]:
    return (*s["bucket"], len(s["frames"]))


def _health(root: Path, samples: list[dict], texts: set[str]) -> str:
    """Every entry present, readable and carrying the fingerprint the index expects."""
    problems = []
    for s in samples:
        meta = read_meta(root / s["file"])
        if meta is None:
            problems.append(f"  {s['file']}: missing or unreadable")
        elif meta.get("fingerprint") != s["fingerprint"]:
            problems.append(f"  {s['file']}: stale (fingerprint differs from index.json)")
    problems += [
        f"  text/{t}.safetensors: missing or unreadable"
        for t in sorted(texts)
        if read_meta(root / "text" / f"{t}.safetensors") is None
    ]
    if not problems:
        return f"entries: all {len(samples)} latent and {len(texts)} text entries readable and current"
    shown = "\n".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return f"entries: {len(problems)} problems (re-run `vidlora prepare` to fix):\n{shown}"


def pick(samples: list[dict], n: int) -> list[dict]:
    """`n` samples: the first of each shape, then the rest in index order."""
    firsts: dict[tuple[int, int, int], dict] = {}
    for s in samples:
        firsts.setdefault(_shape(s), s)
    chosen = list(firsts.values())[:n]
    rest = [s for s in samples if s not in chosen]
    return chosen + rest[: n - len(chosen)]


def load_decoder(family: Encoders) -> torch.nn.Module:
    """`family`'s VAE, on the GPU when there is one, ready for `decode_frames`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return family.load_vae(torch.float32 if device.type == "cpu" else torch.bfloat16).to(device).eval()


@torch.no_grad()
def decode_frames(root: Path, sample: dict[str, Any], vae: torch.nn.Module, family: Encoders) -> np.ndarray:
    """One cached sample decoded back to pixels: uint8 [F, H, W, 3], exactly what the model trains on."""
    latents = load_entry(root / sample["file"])["latents"][None].to(next(vae.parameters()).device)
    pixels = family.decode_video(vae, latents)[0]  # [3, F, H, W] in [-1, 1]
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    return np.ascontiguousarray(frames)


def decode_samples(root: Path, index: dict, n: int, out_dir: str | Path | None, family: Encoders) -> list[Path]:
    """Decode `n` cached latents with `family`'s VAE; writes videos and returns their paths."""
    from data.media import write_image, write_video

    vae = load_decoder(family)
    out = Path(out_dir) if out_dir else root / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s in pick(index["samples"], n):
        frames = decode_frames(root, s, vae, family)
        stem = out / Path(s["file"]).stem
        if len(frames) == 1:
            written.append(write_image(stem.with_suffix(".png"), frames[0]))
        else:
            written.append(write_video(stem.with_suffix(".mp4"), frames, fps=s.get("fps") or 16))
    return written
