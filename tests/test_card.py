"""The model card (README.md) of a real run, read back by huggingface_hub, and `vidlora push --dry-run`."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from data.media import probe
from tests.conftest import run_cli
from trainer.config import load_recipe

pytestmark = pytest.mark.slow


def test_run_card_renders_its_fields(validated_run):
    recipe_path, run, _ = validated_run
    recipe = load_recipe(recipe_path)
    card = ModelCard.load(run / "README.md")  # the hub's own parser
    assert card.data.library_name == "diffusers" and f"for `{recipe.model.path}`" in card.text
    assert card.data.base_model is None  # a local model folder: the hub would refuse it as base_model
    assert {"lora", "vidlora", "wan"} <= set(card.data.tags)
    text = card.text
    assert "(wan)" in text and "trained with vidlora for 6 steps" in text
    assert "None: the adapter was trained on plain captions." in text  # no trigger words in this recipe
    assert (
        "| `pytorch_lora_weights.safetensors` | diffusers |" in text and "| `adapter.safetensors` | vidlora |" in text
    )
    assert f'WanPipeline.from_pretrained("{recipe.model.path}"' in text
    assert 'pipe.load_lora_weights("run", weight_name="pytorch_lora_weights.safetensors")' in text
    assert "[train]" in text and f"max_steps = {recipe.train.max_steps}" in text
    # stills: the middle frame of each video of the last validation step, linked from the card
    videos = sorted((run / "validation/step-000006").glob("*.mp4"))
    stills = sorted((run / "validation_stills").glob("*.png"))
    assert videos and [s.stem for s in stills] == [v.stem for v in videos]
    assert all(f"](validation_stills/{s.name})" in text for s in stills)
    info = probe(stills[0])
    assert (info.width, info.height) == (probe(videos[0]).width, probe(videos[0]).height)


def test_export_folder_gets_a_card_and_push_dry_run_lists_the_files(validated_run, tmp_path):
    _, run, _ = validated_run
    out = tmp_path / "exports"
    proc = run_cli("export", run, "--format", "comfyui", "--out-dir", out, "--dtype", "fp32")
    assert f"card: {out / 'README.md'}" in proc.stdout
    text = ModelCard.load(out / "README.md").text
    assert "| `run_comfyui.safetensors` | comfyui |" in text and "Copy `run_comfyui.safetensors` into" in text
    assert "## Use with diffusers" not in text  # no diffusers file in this folder
    assert len(list((out / "validation_stills").glob("*.png"))) == len(list((run / "validation_stills").glob("*")))

    proc = run_cli("push", run, "--repo", "someone/wan-style", "--dry-run")
    listed = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    stills = sorted(f"validation_stills/{p.name}" for p in (run / "validation_stills").glob("*.png"))
    assert proc.stdout.startswith("would upload to https://huggingface.co/someone/wan-style:")
    assert listed[0] == "README.md" and all((run / f).is_file() for f in listed)
    assert {"adapter.safetensors", "pytorch_lora_weights.safetensors", *stills} <= set(listed)
    assert not [f for f in listed if f.startswith(("checkpoints", "validation/"))]  # no checkpoints, no videos
    proc = run_cli("push", tmp_path, "--repo", "someone/x", "--dry-run", check=False)
    assert proc.returncode == 2 and "no final adapter here" in proc.stderr
