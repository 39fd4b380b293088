"""Model cards and `vidlora push`.

Every folder vidlora exports a run's adapters to (the run folder at the end of training, `vidlora export --out-dir`)
gets a README.md in the Hugging Face hub's model-card format: YAML metadata (written by huggingface_hub's own
ModelCardData) and a page saying what the adapter is (base model, family, expert, kind), its trigger words, the
recipe, the steps trained, stills of the last validation videos, and how to load each file in diffusers and ComfyUI.
Everything comes from the adapters' safetensors headers, so a card can be rebuilt from the files alone.
`vidlora push RUN --repo ID` uploads the card and the adapter files (no checkpoints) with huggingface_hub.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data.cache import atomic_write
from trainer.checkpoint import decode_meta
from trainer.config import UserError

CARD = "README.md"
STILLS = "validation_stills"
LOADERS = {
    "diffusers": "diffusers `load_lora_weights`",
    "comfyui": "ComfyUI (LoraLoaderModelOnly)",
    "kohya": "musubi-tuner / kohya tools, ComfyUI",
    "vidlora": "vidlora (`lora.init_from`, `vidlora export`)",
}


def adapter_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file, header) of every adapter file vidlora wrote directly in ``folder``, sorted by name."""
    out = []
    for path in sorted(folder.glob("*.safetensors")):
        meta = _header(path)
        if meta.get("format") == "vidlora" or meta.get("exported_by") == "vidlora":
            out.append((path, meta))
    return out


def _header(path: Path) -> dict[str, Any]:
    """A safetensors header, JSON values decoded (the tensors are not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return decode_meta(f.metadata() or {})


def write_card(folder: Path, run: Path | None = None) -> Path:
    """Write ``folder``/README.md for the adapters in it; ``run``: the run folder whose validation videos give the
    stills (default: ``folder``)."""
    files = adapter_files(folder)
    if not files:
        raise UserError(f"{folder}: no vidlora adapter files to describe")
    stills = _stills((run or folder) / "validation", folder / STILLS)
    atomic_write(folder / CARD, lambda tmp: Path(tmp).write_text(card_text(folder, files, stills), encoding="utf-8"))
    return folder / CARD


def card_text(folder: Path, files: list[tuple[Path, dict[str, Any]]], stills: list[Path]) -> str:
    from huggingface_hub import ModelCardData

    from trainer.models import family_class

    meta = next((m for _, m in files if m.get("format") == "vidlora"), files[0][1])
    family = meta.get("family", "")
    kind = meta.get("kind", "lora")
    triggers = meta.get("trigger_words") or []
    experts = sorted({m["expert"] for _, m in files if m.get("expert")})
    base = str(meta.get("base_model") or "")
    data = ModelCardData(
        # the hub checks base_model against its repos: a local model folder is named in the text only
        base_model=base if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists() else None,
        library_name="diffusers",
        tags=["lora", kind, "vidlora", family, "text-to-video"],
        instance_prompt=", ".join(triggers) or None,
    )
    cls = family_class(family)
    by_format: dict[str, list[Path]] = {}
    for path, m in files:
        by_format.setdefault(m.get("export_format") or m.get("format", ""), []).append(path)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {folder.name}",
        "",
        f"A {kind.upper() if kind != 'lora' else 'LoRA'} adapter (rank {meta.get('rank')}, alpha {meta.get('alpha')}) "
        f"for `{meta.get('base_model')}` ({family}{', experts: ' + ', '.join(experts) if experts else ''}), "
        f"trained with vidlora for {meta.get('steps')} steps"
        + (f" (EMA of the weights, decay {meta['ema_decay']})" if meta.get("ema_decay") else "")
        + ".",
        "",
        "## Trigger words",
        "",
        ", ".join(f"`{t}`" for t in triggers) if triggers else "None: the adapter was trained on plain captions.",
        "",
        "## Files",
        "",
        "| file | format | load with |",
        "|---|---|---|",
        *(f"| `{p.name}` | {fmt} | {LOADERS.get(fmt, fmt)} |" for fmt, ps in by_format.items() for p in ps),
        "",
    ]
    if "diffusers" in by_format:
        loads = [
            f'pipe.load_lora_weights("{folder.name}", weight_name="{p.name}")'
            + ("  # for its expert: see vidlora's docs/models.md" if experts else "")
            for p in by_format["diffusers"]
        ]
        lines += [
            "## Use with diffusers",
            "",
            "```python",
            "import torch",
            f"from diffusers import {cls.pipeline_class.__name__}",
            "",
            f'pipe = {cls.pipeline_class.__name__}.from_pretrained("{meta.get("base_model")}", '
            "torch_dtype=torch.bfloat16)",
            *loads,
            "```",
            "",
        ]
    comfy = by_format.get("comfyui") or by_format.get("kohya")
    if comfy:
        lines += [
            "## Use with ComfyUI",
            "",
            f"Copy `{comfy[0].name}` into `ComfyUI/models/loras/` and apply it to the model with a "
            "`LoraLoaderModelOnly` node.",
            "",
        ]
    if stills:
        lines += ["## Validation", "", *(f"![{s.stem}]({STILLS}/{s.name})" for s in stills), ""]
    recipe = meta.get("recipe")
    if recipe:
        lines += ["## Training recipe", "", "```toml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def _stills(validation: Path, out: Path) -> list[Path]:
    """The middle frame of each video of the last validation step, as PNGs in ``out``."""
    from data.media import probe, read_frames, write_image

    steps = sorted(p for p in validation.glob("step-*") if p.is_dir() and p.name[5:].isdigit())
    videos = sorted(steps[-1].glob("*.mp4")) if steps else []
    written = []
    for video in videos:
        info = probe(video)
        frame = read_frames(info, [info.num_frames // 2])[0]
        still = out / f"{video.stem}.png"
        atomic_write(still, lambda tmp, f=frame: write_image(tmp, f, format="PNG"))
        written.append(still)
    return written


def push_files(run: Path) -> list[Path]:
    """What `vidlora push` uploads from ``run``: the card, the adapter files and the validation stills."""
    files = [p for p, _ in adapter_files(run)]
    if not files:
        raise UserError(f"{run}: no final adapter here (let training finish, or `vidlora export` a checkpoint here)")
    if not (run / CARD).is_file():
        write_card(run)
    return [run / CARD, *files, *sorted((run / STILLS).glob("*.png"))]


def push(run: str | Path, repo: str, dry_run: bool = False, private: bool = False) -> list[Path]:
    """Upload the card and adapters of ``run`` to the hub model repo ``repo`` (created if missing)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: not a run folder")
    files = push_files(run)
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    patterns = [p.relative_to(run).as_posix() for p in files]
    api.upload_folder(folder_path=run, repo_id=repo, allow_patterns=patterns, commit_message="vidlora push")
    return files


def write_cards(folders: Iterable[tuple[Path, Path]]) -> list[Path]:
    """A card in each (export folder, run folder) pair."""
    return [write_card(folder, run) for folder, run in dict(folders).items()]
