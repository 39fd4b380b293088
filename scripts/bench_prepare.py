"""Benchmark: `prepare` against a bare loop that makes the same cache one item at a time.

Same clips, same tiny Wan model, same machine, same command. The bare loop decodes a clip (decord), resizes
it, encodes it with the VAE and saves the latents, one sample after the other, then embeds each caption;
`prepare` does the same work plus its bookkeeping (discovery, probing, fingerprints, report), decoding in
worker processes while the VAE encodes same-shape batches. Runs alternate (bare, prepare, bare, ...) and
the best of each is kept, so a busy neighbour on the machine hurts both alike. The ratio is prepare's
samples/s over the bare loop's; it should be >= 1.0 (the overlap pays for the bookkeeping).

    PYTHONPATH=. python scripts/bench_prepare.py [--clips 16] [--repeats 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import decord
import torch
from safetensors.torch import save_file

from data import media, synth
from data.buckets import bucket_sizes, choose_bucket, resize_crop
from data.prepare import prepare
from trainer.config import Recipe
from trainer.models import DEFAULT_FAMILY, family_class, get_family

WIDTH, HEIGHT, FRAMES, TARGET, RESOLUTION = 160, 120, 49, 33, 128


def make_clips(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = media.write_video(folder / f"clip_{i:03d}.mp4", synth.pattern_frames(FRAMES, WIDTH, HEIGHT, seed=i))
        path.with_suffix(".txt").write_text(synth.pattern_caption(i) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def bare_loop(recipe: Recipe, clips: list[Path], out: Path) -> int:
    """Decode, resize, encode, save: one sample at a time, nothing else."""
    family = get_family(recipe.model)
    vae = family.load_vae(torch.float32).eval()
    bucket = choose_bucket(WIDTH, HEIGHT, bucket_sizes(RESOLUTION))
    out.mkdir(parents=True)
    with torch.no_grad():
        for clip in clips:
            frames = decord.VideoReader(str(clip)).get_batch(list(range(TARGET))).asnumpy()
            pixels = torch.from_numpy(resize_crop(frames, bucket)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            latents = family.encode_video(vae, pixels)["latents"][0]
            save_file({"latents": latents.to(torch.float32).contiguous()}, str(out / f"{clip.stem}.safetensors"))
        del vae
        pipe = family.load_text_pipeline(torch.float32)
        for clip in clips:
            (embeds,) = family.encode_prompts(pipe, [clip.with_suffix(".txt").read_text().strip()])
            save_file({k: v.contiguous() for k, v in embeds.items()}, str(out / f"{clip.stem}.text.safetensors"))
    return len(clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="prepare's decode_workers")
    parser.add_argument("--batch", type=int, default=4, help="prepare's encode_batch_size")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        model = family_class(DEFAULT_FAMILY).make_tiny(work / "model")
        clips = make_clips(work / "clips", args.clips)

        def recipe(cache: Path) -> Recipe:
            return Recipe.model_validate(
                {
                    "model": {"path": str(model)},
                    "data": {
                        "cache_dir": str(cache),
                        "cache_dtype": "fp32",
                        "decode_workers": args.workers,
                        "encode_batch_size": args.batch,
                        "datasets": [
                            {"path": str(clips[0].parent), "resolutions": [RESOLUTION], "target_frames": [TARGET]}
                        ],
                    },
                }
            )

        best = {"bare loop": float("inf"), "prepare": float("inf")}
        for r in range(args.repeats):
            start = time.perf_counter()
            n = bare_loop(recipe(work / "unused"), clips, work / f"bare_{r}")
            best["bare loop"] = min(best["bare loop"], time.perf_counter() - start)
            start = time.perf_counter()
            prepared = recipe(work / f"cache_{r}")
            assert prepare(prepared, get_family(prepared.model)) == 0
            best["prepare"] = min(best["prepare"], time.perf_counter() - start)
        rates = {k: n / v for k, v in best.items()}
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"\n{n} samples of {TARGET} frames {WIDTH}x{HEIGHT}, tiny Wan VAE on the CPU, {torch.get_num_threads()} threads"
        )
        print(f"prepare: decode_workers={args.workers}, encode_batch_size={args.batch}; load average now {load}")
        for name, rate in rates.items():
            print(f"{name:>10}: {best[name]:6.2f} s  {rate:6.2f} samples/s")
        print(f"ratio prepare / bare loop: {rates['prepare'] / rates['bare loop']:.2f}  (goal >= 1.0)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
