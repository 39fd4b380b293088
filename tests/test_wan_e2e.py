"""The spine end to end on a tiny Wan model and real clips: make-tiny -> prepare -> train -> export ->
diffusers' own WanPipeline.load_lora_weights reproduces the trained transformer."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanPipeline

from data import media, synth
from data.cache import load_entry
from tests.conftest import assert_diffusers_reproduces, fixed_eval_loss, run_cli, train_capturing, write_recipe
from trainer.config import ModelSection, load_recipe
from trainer.models import get_family

pytestmark = pytest.mark.slow


def recipe_text(tmp, model, clips, steps=100, extra=""):
    return f"""
[model]
path = "{model}"
[data]
cache_dir = "{tmp / "cache"}"
cache_dtype = "fp32"
decode_workers = 0
[[data.datasets]]
path = "{clips}"
resolutions = [64]
target_frames = [9]
[lora]
rank = 8
alpha = 16
[train]
output_dir = "{tmp / "run"}"
max_steps = {steps}
learning_rate = 5e-3
checkpoint_every = 100
dataloader_workers = 0
[logging]
wandb = false
[export]
dtype = "fp32"
formats = ["diffusers", "kohya"]
{extra}
"""


def test_make_tiny_loads_like_a_real_model(tiny_wan):
    pipe = WanPipeline.from_pretrained(tiny_wan)
    assert pipe.transformer.config.num_layers == 2 and pipe.vae.config.z_dim == 16
    family = get_family(ModelSection(path=str(tiny_wan)))
    transformer = family.load_transformer(torch.float32)
    assert sum(p.numel() for p in transformer.parameters()) == sum(p.numel() for p in pipe.transformer.parameters())


def test_overfit_then_export_round_trip(tmp_path, tiny_wan, monkeypatch):
    clips = tmp_path / "clips"
    media.write_video(clips / "one clip.mp4", synth.pattern_frames(9, 64, 64, seed=3))
    (clips / "one clip.txt").write_text("a red car drives through a city street at night\n", encoding="utf-8")
    recipe_path = write_recipe(tmp_path / "r.toml", recipe_text(tmp_path, tiny_wan, clips, steps=200))
    run_cli("prepare", recipe_path)
    report = json.loads((tmp_path / "cache/report.json").read_text())
    assert report["counts"] == {"ok": 1} and report["samples"] == 1

    # Train in-process so the trained transformer can be inspected; the real loop runs unchanged.
    recipe = load_recipe(recipe_path)
    run, trained = train_capturing(recipe)

    family = get_family(recipe.model)
    base = family.load_transformer(torch.float32)
    # Base weights did not move; LoRA weights did.
    trained_state = trained.state_dict()
    for name, value in base.state_dict().items():
        key = (
            name
            if name in trained_state
            else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(trained_state[key], value), name
    lora_b = [v for k, v in trained_state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # peft initialises B to zero

    # The loss on the training clip dropped clearly.
    entry = next((tmp_path / "cache/samples").rglob("*.safetensors"))
    latents = load_entry(entry)["latents"][None]
    text_file = next((tmp_path / "cache/text").glob("*.safetensors"))
    text = family.collate_text([load_entry(text_file)])
    before = fixed_eval_loss(family, base, latents, text)
    after = fixed_eval_loss(family, trained, latents, text)
    assert after < 0.75 * before, (before, after)

    # Export and load with diffusers' own loader into a fresh pipeline: same outputs as the trained model.
    out = tmp_path / "exported.safetensors"
    run_cli("export", run, "--out", out, "--dtype", "fp32")
    shape = (1, 16, 3, 8, 8)
    assert_diffusers_reproduces(WanPipeline, tiny_wan, out, family, trained, shape, text)
    # Training also wrote every other format of export.formats; the kohya file loads the same way.
    assert_diffusers_reproduces(
        WanPipeline, tiny_wan, run / f"{run.name}_kohya.safetensors", family, trained, shape, text
    )

    # The final adapter in the run folder is the same diffusers file, with metadata in its header.
    from safetensors import safe_open

    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["family"] == "wan" and meta["rank"] == "8" and float(meta["alpha"]) == 16 and meta["steps"] == "200"
    assert meta["base_model"] == str(tiny_wan) and "[train]" in meta["recipe"] and "attn1" in meta["target_modules"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000100", "step-000200"]
