"""The `vidlora` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from pathlib import Path

EPILOG = "Recipes: recipes/*/*.toml; every key is documented in docs/recipes.md."


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. --set train.max_steps=200 --set data.datasets.0.path=clips",
    )


def _output_args(p: argparse.ArgumentParser, flag: str, help: str, required: bool = False) -> None:
    p.add_argument(
        flag,
        dest="formats",
        action="append",
        required=required,
        choices=["diffusers", "comfyui", "kohya", "all"],
        help=help,
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, help="output .safetensors file (one input, one format)")
    out.add_argument(
        "--out-dir", type=Path, help="output folder for NAME_FORMAT.safetensors files (default: next to the input)"
    )


def _print_written(written: list) -> None:
    for w in written:
        print(f"{w.fmt}: {w.path}  ({w.source.family}, from {w.source.fmt} {w.source.path})")
        for note in w.notes:
            print(f"  note: {note}")


def build_parser() -> argparse.ArgumentParser:
    from trainer.models import FAMILIES  # the registry only: no model code is imported for --help

    families = sorted(FAMILIES)
    parser = argparse.ArgumentParser(
        prog="vidlora", description="LoRA fine-tuning for the Wan and HunyuanVideo video models.", epilog=EPILOG
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write a tiny random model folder (diffusers layout) for demos and tests")
    p.add_argument("family", choices=families, help="model family (docs/models.md)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("make-clips", help="write a few small captioned sample clips (PyAV, no ffmpeg needed)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--count", type=int, default=4)

    p = sub.add_parser("prepare", help="decode clips and captions into latent and text-embedding caches")
    _recipe_args(p)
    p.add_argument("--strict", action="store_true", help="exit non-zero when any input was skipped or failed")
    p.add_argument("--dry-run", action="store_true", help="only plan: report every input's windows and buckets")
    p.add_argument("--prune", action="store_true", help="delete cache entries the current plan no longer makes")

    p = sub.add_parser("inspect", help="summarise a prepared cache; optionally decode samples back to video")
    p.add_argument("cache_dir", type=Path)
    p.add_argument("--decode", type=int, default=0, metavar="N", help="decode N samples (one per bucket first)")
    p.add_argument("--out", type=Path, help="folder for decoded .mp4 files (default: CACHE_DIR/inspect)")
    p.add_argument("--model", help="model folder or hub id to decode with (default: the one in index.json)")

    p = sub.add_parser("train", help="train a LoRA on prepared caches (works under `accelerate launch`)")
    _recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest checkpoint, or from PATH")

    p = sub.add_parser(
        "export",
        help="write a run's or checkpoint's adapter in the formats loaders read (diffusers, comfyui, kohya)",
        description="Write an adapter for diffusers (diffusers), ComfyUI (comfyui) or kohya/musubi tools (kohya); "
        "see docs/export.md. Each file is checked and carries its training metadata.",
    )
    p.add_argument("source", help="run folder, checkpoint folder or adapter file")
    _output_args(
        p, "--format", "format (repeatable, or 'all'); default: the run's export.formats (diffusers with --out)"
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the run's export.dtype")
    p.add_argument("--name", help="file-name stem with --out-dir (default: the run's name)")

    p = sub.add_parser(
        "convert",
        help="convert LoRA files made by any tool between diffusers, comfyui and kohya layouts",
        description="Detect the format and model family of each input from its keys, check it, and write it in "
        "the formats asked for. Unmappable keys and non-finite values are refused, naming them.",
    )
    p.add_argument("inputs", nargs="+", help="LoRA .safetensors files (or vidlora runs / checkpoints)")
    _output_args(p, "--to", "target format (repeatable, or 'all')", required=True)
    p.add_argument("--family", choices=families, help="model family, if detection fails")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: keep the input's")

    p = sub.add_parser(
        "push",
        help="upload a run's adapters and model card (README.md) to a Hugging Face hub model repo",
        description="Upload the run folder's model card, final adapter files and validation stills (no checkpoints) "
        "with huggingface_hub; the repo is created if missing. Log in first (`hf auth login` or HF_TOKEN).",
    )
    p.add_argument("run", type=Path, help="run folder (after training, or after `vidlora export` into it)")
    p.add_argument("--repo", required=True, help="hub repo id, e.g. you/wan-style-lora")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")

    p = sub.add_parser(
        "merge",
        help="bake an adapter into the base transformer weights (a diffusers transformer folder)",
        description="Add strength x the LoRA update to the base weights, shard by shard, and write a diffusers "
        "transformer folder that <TransformerClass>.from_pretrained loads (same as diffusers' fuse_lora).",
    )
    p.add_argument("base", help="diffusers model folder (with transformer/) or transformer folder")
    p.add_argument("adapter", help="LoRA file in any format, or a vidlora run / checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist, or be empty)")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA scale (default 1.0)")
    p.add_argument("--family", choices=families, help="model family, if detection fails")

    p = sub.add_parser("sample", help="generate a video with the diffusers pipeline, optionally with a LoRA")
    _recipe_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, type=Path, help="output .mp4")
    p.add_argument("--lora", help="adapter file to load with load_lora_weights")
    p.add_argument("--image", help="first frame (any image file) for image-to-video families such as wan_i2v")
    p.add_argument("--frames", type=int, help="default: the recipe's validation.num_frames (17 unless set)")
    p.add_argument(
        "--height", type=int, help="default: the recipe's validation.height, else its first training bucket's"
    )
    p.add_argument(
        "--width",
        type=int,
        help="default: the recipe's validation.width, else its first training bucket's (the first dataset's first "
        "resolution)",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("env", help="print versions, GPUs and what they support, for bug reports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--build-ops", action="store_true", help="also JIT-build DeepSpeed's ops now (slow, once)")

    p = sub.add_parser(
        "report",
        help="one HTML page (opens from disk) of a run or a cache: inputs, buckets, thumbnails, curves, videos",
        description="Write a self-contained HTML report (docs/report.md). Given a run folder: its training (curves, "
        "validation videos, recipe, environment) and its dataset (the cache named in its recipe.toml); given a cache: "
        "the dataset only. Works on a run in progress.",
    )
    p.add_argument("path", type=Path, help="run folder or prepared cache folder")
    p.add_argument("--out", type=Path, help="output .html (default: PATH/report.html)")
    p.add_argument(
        "--thumbnails", type=int, default=8, metavar="N", help="samples decoded with the VAE for thumbnails (0: none)"
    )
    p.add_argument("--model", help="model folder or hub id to decode with (default: the one in the cache's index.json)")

    p = sub.add_parser("plot", help="draw a run's loss curve (metrics.jsonl) to a PNG")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="output .png (default: RUN_DIR/loss.png)")
    return parser


def cache_family(cache_dir: Path, model: str | None = None):
    """The family that made a cache, loading from `model` (default: the model its index.json names)."""
    from data.prepare import load_index
    from trainer.config import ModelSection
    from trainer.models import get_family

    index = load_index(cache_dir)
    return get_family(
        ModelSection(family=index["family"], path=model or index["model"], revision=index.get("model_revision"))
    )


def run(args: argparse.Namespace) -> int:
    from trainer.config import load_recipe

    if args.command == "make-tiny":
        from trainer.models import family_class

        print(f"tiny {args.family} model: {family_class(args.family).make_tiny(args.out_dir, seed=args.seed)}")
    elif args.command == "make-clips":
        from data.synth import make_sample_clips

        paths = make_sample_clips(args.out_dir, n=args.count)
        print(f"{len(paths)} sample files with captions in {args.out_dir}")
    elif args.command == "prepare":
        from data.prepare import prepare
        from trainer.models import get_family

        recipe = load_recipe(args.recipe, args.overrides)
        return prepare(recipe, get_family(recipe.model), strict=args.strict, dry_run=args.dry_run, prune=args.prune)
    elif args.command == "inspect":
        from data.inspect import inspect_cache

        family = cache_family(args.cache_dir, args.model) if args.decode else None
        print(inspect_cache(args.cache_dir, decode=args.decode, out_dir=args.out, family=family))
    elif args.command == "train":
        from trainer.train import train

        run_dir = train(load_recipe(args.recipe, args.overrides), resume=args.resume)
        if os.environ.get("RANK", "0") == "0":
            print(f"run: {run_dir}")
            print(f"see it: vidlora report {shlex.quote(str(run_dir))}")
    elif args.command in ("export", "convert"):
        from trainer.export import export_files

        sources = [args.source] if args.command == "export" else args.inputs
        name = getattr(args, "name", None)
        family = getattr(args, "family", None)
        written = export_files(sources, args.formats, args.out, args.out_dir, args.dtype, family, name)
        _print_written(written)
        if args.command == "export":  # a model card next to a trained adapter's files (README.md)
            from trainer.card import write_cards
            from trainer.export import default_output

            trained = [w for w in written if w.source.meta.get("recipe")]
            for card in write_cards((w.path.parent, default_output(w.source)[0]) for w in trained):
                print(f"card: {card}")
    elif args.command == "push":
        from trainer.card import push

        files = push(args.run, args.repo, dry_run=args.dry_run, private=args.private)
        verb = "would upload" if args.dry_run else "uploaded"
        print(f"{verb} to https://huggingface.co/{args.repo}:")
        for f in files:
            print(f"  {f.relative_to(args.run).as_posix()}")
    elif args.command == "merge":
        from trainer.export import merge_into_folder

        print(f"merged: {merge_into_folder(args.base, args.adapter, args.out, args.strength, args.family)}")
    elif args.command == "sample":
        from trainer.sample import sample

        out = sample(
            load_recipe(args.recipe, args.overrides),
            args.prompt,
            args.out,
            args.lora,
            args.frames,
            args.height,
            args.width,
            args.steps,
            args.seed,
            image=args.image,
        )
        print(f"sample: {out}")
    elif args.command == "env":
        import json

        from trainer.env import collect, format_report

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed and bitsandbytes print on import
            info = collect(build_ops=args.build_ops)
        print(json.dumps(info, indent=1) if args.json else format_report(info))
    elif args.command == "report":
        from trainer.report import build_report

        path = build_report(args.path, args.out, args.thumbnails, lambda cache: cache_family(cache, args.model))
        print(f"report: {path}")
    elif args.command == "plot":
        from trainer.plot import plot

        print(f"plot: {plot(args.run_dir, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in (
        "bitsandbytes",  # e.g. its CPU kernel line on import
        "DeepSpeed",
        "deepspeed",
        "httpx",
        "accelerate.checkpointing",
        "accelerate.accelerator",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # DeepSpeed resets its logger's level on import, then says it picked the CPU on every command that imports it
    logging.getLogger("DeepSpeed").addFilter(lambda r: not r.getMessage().startswith("Setting accelerator to CPU"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from data.discover import DiscoveryError
    from trainer.config import UserError
    from trainer.formats import LoraFormatError

    try:
        return run(args)
    except (UserError, DiscoveryError, LoraFormatError, FileNotFoundError) as e:
        print(f"vidlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vidlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from trainer.train import Interrupted

        if not isinstance(e, Interrupted):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"vidlora: interrupted: {e}\nresume with: {resume_command(args)}", file=sys.stderr)
        return 130


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues an interrupted run: the same recipe and --set overrides, plus --resume."""
    command = ["train", args.recipe, *[x for o in args.overrides for x in ("--set", o)], "--resume"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"accelerate launch <the same options> -m trainer.cli {shlex.join(command)}"
    return f"vidlora {shlex.join(command)}"


if __name__ == "__main__":
    sys.exit(main())
