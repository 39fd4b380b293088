"""Video sizes and the model: the tiny models take the shipped recipes' buckets, a size the transformer cannot
take stops prepare, train and sample with one line (not a shape error inside the model at step 1), and
`vidlora sample` takes its default size from the recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data.buckets import bucket_sizes
from data.media import probe
from tests.conftest import ROOT, run_cli, write_recipe
from tests.training_setup import recipe_text
from trainer.config import ModelSection, load_recipe
from trainer.models import get_family

WAN_RECIPES = sorted((ROOT / "recipes" / "wan").glob("*.toml"))


def recipe_shapes(recipe) -> set[tuple[int, int, int]]:
    """Every (width, height, frames) the recipe's datasets can make (the buckets of every resolution)."""
    return {
        (w, h, f)
        for ds in recipe.data.datasets
        for r in ds.resolutions
        for w, h in bucket_sizes(r, max_ratio=ds.max_aspect_ratio)
        for f in ds.target_frames
    }


@pytest.mark.parametrize("recipe_file", WAN_RECIPES, ids=lambda p: p.stem)
def test_tiny_wan_takes_every_bucket_of_the_shipped_recipes(tiny_wan, recipe_file):
    recipe = load_recipe(recipe_file, [f'model.path="{tiny_wan}"'])
    family = get_family(recipe.model)
    shapes = recipe_shapes(recipe)
    family.check_shapes(shapes, "bucket")  # raises on a size the transformer cannot take
    # The widest bucket (Wan 480p: 896x448, 56 patches across) through the real tiny transformer, one frame.
    width, height, _ = max(shapes, key=lambda s: max(s[:2]))
    t2v = get_family(ModelSection(family="wan", path=str(tiny_wan)))
    latents = torch.randn(1, 16, 1, height // 8, width // 8)
    with torch.no_grad():
        out = t2v.predict(
            t2v.load_transformer(torch.float32), latents, torch.tensor([0.5]), {"prompt_embeds": torch.randn(1, 7, 32)}
        )
    assert out.shape == latents.shape


@pytest.fixture
def short_rope_model(tmp_path, tiny_wan) -> Path:
    """The tiny Wan with a RoPE table of 2 positions per axis: 64x64 (4x4 patches) is too large for it."""
    model = tmp_path / "short_rope"
    shutil.copytree(tiny_wan, model)
    config = model / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_max_seq_len": 2}))
    return model


def assert_one_line_error(proc, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("vidlora: error: ") and all(p in line for p in parts), line


def test_prepare_refuses_a_bucket_the_model_cannot_take(tmp_path, prepared, short_rope_model):
    """recipe_text reads the clips next to the cache folder: the prepared fixture's four 64x64 clips."""
    shutil.copytree(prepared[1].parent / "clips", tmp_path / "clips")
    text = recipe_text(short_rope_model, tmp_path / "cache", tmp_path / "run")
    proc = run_cli("prepare", write_recipe(tmp_path / "r.toml", text), check=False)
    assert_one_line_error(proc, "64x64", "9 frames", "rope_max_seq_len")
    assert not (tmp_path / "cache" / "samples").exists()  # refused before encoding anything


def test_train_refuses_cached_sizes_the_model_cannot_take(tmp_path, prepared, short_rope_model):
    _, cache = prepared
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(short_rope_model, cache, tmp_path / "run"))
    proc = run_cli("train", recipe, check=False)
    assert_one_line_error(proc, "64x64", "9 frames", "rope_max_seq_len")


def test_sample_size_defaults_come_from_the_recipe(tmp_path, tiny_wan):
    help_text = run_cli("sample", "--help").stdout
    assert "validation.width" in help_text and "validation.num_frames" in help_text and "bucket" in help_text
    recipe = write_recipe(
        tmp_path / "r.toml",
        f'[model]\npath = "{tiny_wan}"\n[[data.datasets]]\npath = "clips"\nresolutions = [[48, 32]]\n'
        "[validation]\nnum_frames = 5\n",
    )
    out = tmp_path / "s.mp4"
    run_cli("sample", recipe, "--prompt", "a cat", "--steps", "1", "--out", out)
    info = probe(out)
    assert (info.width, info.height, info.num_frames) == (48, 32, 5)
