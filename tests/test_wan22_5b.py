"""Wan 2.2 TI2V-5B (`wan22_5b`) on its tiny model (`vidlora make-tiny wan22_5b`: the Wan 2.2 VAE's layout with 48
latent channels and 16x spatial compression, a 48-channel transformer), one real clip prepared by the real CLI:

- what the transformer sees in training, built from the cache, equals what `WanPipeline(expand_timesteps=True)` and
  `WanImageToVideoPipeline` feed it (captured with a hook inside real pipeline calls): same latents layout, same
  per-token timesteps, the image-to-video first frame taken from the clip's own cached latent;
- the image-to-video loss ignores the conditioning frame; the choice of mode is seeded per sample, and a sample's
  loss does not depend on its batch (so 1 vs 2 processes and resumes stay exact);
- training lowers the loss in both modes; a mixed run validates in both modes and its exports load into diffusers.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data import media, synth
from data.buckets import bucket_sizes, resize_crop
from data.cache import load_entry
from data.dataset import CachedDataset
from tests.conftest import ROOT, assert_diffusers_reproduces, run_cli, train_capturing, write_recipe
from tests.training_setup import recipe_text
from trainer import perf
from trainer.config import RecipeError, UserError, load_recipe
from trainer.flow_matching import flow_mse, noisy_and_target, step_generator
from trainer.models import family_class, get_family
from trainer.models.base import Denoisers
from trainer.models.wan import tiny_transformer_config
from trainer.sample import sample
from trainer.train import build_model, collate_batch, flow_loss, train

CAPTION = "a blue square moves left over a gradient"


@pytest.fixture(scope="module")
def five_b(tmp_path_factory):
    """(model folder, prepared cache): one real 9-frame 64x64 clip at the model's 24 fps, and a first frame."""
    root = tmp_path_factory.mktemp("wan22_5b")
    family_class("wan22_5b").make_tiny(root / "model")  # what `vidlora make-tiny wan22_5b` runs
    media.write_video(root / "clips/clip.mp4", synth.pattern_frames(9, 64, 64, seed=3), fps=24)
    (root / "clips/clip.txt").write_text(CAPTION + "\n", encoding="utf-8")
    media.write_image(root / "first.png", synth.pattern_frames(1, 80, 60, seed=5)[0])
    recipe = recipe_text(root / "model", root / "cache", root / "unused", family="wan22_5b")
    run_cli("prepare", write_recipe(root / "prepare.toml", recipe))
    return root / "model", root / "cache"


def recipe_for(five_b, mode: str = "t2v", *overrides: str):
    model, cache = five_b
    return load_recipe(
        None,
        ["model.family=wan22_5b", f"model.path={model}", f"data.cache_dir={cache}", f"train.ti2v={mode}", *overrides],
    )


def cached_batch(five_b, family):
    """The training batch of the cached clip, as the loop collates it, and its cache entry."""
    dataset = CachedDataset(five_b[1])
    entry = dataset.entries[0]
    return collate_batch(family, [dataset.load(entry, entry["text_ids"][0])]), entry


def transformer_inputs(transformer, run) -> dict:
    """The keyword arguments of the transformer's first call while `run()` runs."""
    seen = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        hook.remove()
    return seen[0]


def test_one_cache_entry_serves_both_modes(five_b):
    family = get_family(recipe_for(five_b).model)
    assert family.bucket_step() == 32  # VAE 16 x patch 2
    batch, entry = cached_batch(five_b, family)
    assert set(load_entry(five_b[1] / entry["file"])) == {"latents"}
    assert batch["latents"].shape == (1, 48, 3, 4, 4)  # 48 channels, 4x temporal, 16x spatial
    assert entry["fps"] == 24.0


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_training_feed_equals_what_the_pipeline_feeds_its_transformer(five_b, mode):
    """A real pipeline call, its first denoising step captured by a hook, against the training call on the cached
    batch with the same noise at the same noise level. For image-to-video the pipeline gets the clip's first frame
    as prepare decoded it, and encodes it itself: the cached latent's frame 0 must be what it makes of it."""
    model, _ = five_b
    recipe = recipe_for(five_b, mode)
    family = get_family(recipe.model)
    batch, entry = cached_batch(five_b, family)
    width, height = entry["bucket"]
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    call = dict(prompt=CAPTION, height=height, width=width, num_frames=len(entry["frames"]), guidance_scale=1.0)
    if mode == "i2v":
        first = resize_crop(media.read_frames(media.probe(entry["source"]), entry["frames"][:1]), (width, height))
        pipe = WanImageToVideoPipeline.from_pretrained(model)  # the same folder: diffusers' I2V use of the model
        call["image"] = Image.fromarray(first[0])
    else:
        pipe = WanPipeline.from_pretrained(model)
    assert pipe.config.expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    want = transformer_inputs(
        pipe.transformer, lambda: pipe(**call, latents=noise, num_inference_steps=1, output_type="latent")
    )
    t = want["timestep"].max()
    assert t > 900  # the first step of the schedule

    batch = {**batch, **family.draw_conditions(recipe.train, [torch.Generator()])}
    got = transformer_inputs(
        pipe.transformer, lambda: family.predict(pipe.transformer, noise, (t / 1000).reshape(1), batch)
    )
    tokens = 2 * 2  # per latent frame: its 4x4 latent in 2x2 patches
    expected_t = torch.full((1, 3 * tokens), float(t))
    if mode == "i2v":
        expected_t[:, :tokens] = 0  # the conditioning frame's tokens
    assert torch.equal(want["timestep"], expected_t)
    assert torch.equal(got["timestep"], want["timestep"])
    assert torch.equal(got["encoder_hidden_states"], want["encoder_hidden_states"])  # 512 tokens, zero-padded
    hidden, pipe_hidden = got["hidden_states"], want["hidden_states"]
    assert hidden.shape == pipe_hidden.shape == (1, 48, 3, 4, 4)
    assert torch.equal(hidden[:, :, 1:], pipe_hidden[:, :, 1:])
    if mode == "i2v":  # the pipeline's own encoding of the first frame == the cached clip latent's frame 0
        assert torch.equal(hidden[:, :, 0], batch["latents"][:, :, 0])
        torch.testing.assert_close(pipe_hidden[:, :, 0], hidden[:, :, 0], atol=1e-5, rtol=0)
        assert not torch.allclose(pipe_hidden[:, :, 0], noise[:, :, 0])
    else:
        assert torch.equal(hidden, pipe_hidden)


def test_i2v_loss_ignores_the_conditioning_frame(five_b):
    """Through the loop's own flow_loss: moving the prediction on frame 0 moves the T2V loss, never the I2V one;
    the I2V sample's frame 0 is its clean latent at timestep 0, and its other frames get the same noise and noise
    level as in T2V mode (the mode is drawn after them)."""
    family = get_family(recipe_for(five_b).model)
    batch, _ = cached_batch(five_b, family)
    transformer = family.load_transformer(torch.float32)
    model = Denoisers(family, {"transformer": transformer})

    def bump(module, args, output):
        out = output[0].clone()
        out[:, :, 0] += 100.0
        return (out,)

    def run(mode: str, bumped: bool):
        inputs = []
        hooks = [transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw), with_kwargs=True)]
        if bumped:
            hooks.append(transformer.register_forward_hook(bump))
        try:
            with torch.no_grad():
                loss = flow_loss(model, batch, recipe_for(five_b, mode), [step_generator(7, 3, 0)])
        finally:
            for hook in hooks:
                hook.remove()
        return loss.item(), inputs[0]

    (t2v, t2v_in), (t2v_bumped, _) = run("t2v", False), run("t2v", True)
    (i2v, i2v_in), (i2v_bumped, _) = run("i2v", False), run("i2v", True)
    assert t2v_bumped > t2v + 100 and i2v_bumped == i2v
    tokens = 2 * 2  # per latent frame
    assert torch.equal(i2v_in["hidden_states"][:, :, 0], batch["latents"][:, :, 0])
    assert torch.equal(i2v_in["hidden_states"][:, :, 1:], t2v_in["hidden_states"][:, :, 1:])
    assert not i2v_in["timestep"][:, :tokens].any()
    assert torch.equal(i2v_in["timestep"][:, tokens:], t2v_in["timestep"][:, tokens:])


def test_mixed_mode_is_drawn_per_sample_from_the_seed_and_a_sample_loss_ignores_its_batch(five_b):
    """train.ti2v = "mixed": each slot's choice comes from its own (seed, micro-step, slot) generator with the recipe's
    share; and a batch's loss is the mean of its samples' losses, whatever the mix, so two processes with one sample
    each train on what one process with both does (DDP averages the two losses' gradients)."""
    recipe = recipe_for(five_b, "mixed", "train.ti2v_i2v_share=0.3")
    family = get_family(recipe.model)
    flags = [family.draw_conditions(recipe.train, [step_generator(42, m, s) for s in range(4)]) for m in range(500)]
    drawn = torch.stack([f["first_frame"] for f in flags])
    assert drawn.float().mean().item() == pytest.approx(0.3, abs=0.04)
    alone = family.draw_conditions(recipe.train, [step_generator(42, 17, 2)])["first_frame"]
    assert torch.equal(alone, drawn[17, 2:3])  # a slot's draw does not depend on the others in its batch

    batch, _ = cached_batch(five_b, family)
    pair = {k: torch.cat([v, v]) if torch.is_tensor(v) else v + v for k, v in batch.items()}
    micro = next(m for m in range(500) if drawn[m, 0] != drawn[m, 1])  # one sample of each mode
    model = Denoisers(family, {"transformer": family.load_transformer(torch.float32)})
    with torch.no_grad():
        both = flow_loss(model, pair, recipe, [step_generator(42, micro, s) for s in (0, 1)])
        each = [flow_loss(model, batch, recipe, [step_generator(42, micro, s)]) for s in (0, 1)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, atol=1e-6, rtol=1e-6)


def test_modes_are_refused_where_they_mean_nothing(five_b):
    """Before anything loads: train.ti2v on a family that has no such choice; an image-to-video-only run without
    validation.images."""
    with pytest.raises(RecipeError, match=r"^train.ti2v = 'mixed': the wan family does not choose"):
        train(load_recipe(None, ["model.family=wan", "model.path=nowhere", "train.ti2v=mixed"]))
    family = get_family(recipe_for(five_b).model)
    with pytest.raises(UserError, match="validation.images"):
        family.validation_videos(recipe_for(five_b, "i2v").train, None, 64, 64)
    assert [s for s, _ in family.validation_videos(recipe_for(five_b, "t2v").train, None, 64, 64)] == ["t2v"]


@pytest.mark.parametrize("name", ["ti2v_5b_720p", "ti2v_5b_tiny"])
def test_shipped_recipes_buckets_step_32_pixels_and_fit_the_transformer(five_b, name):
    recipe = load_recipe(ROOT / "recipes/wan22" / f"{name}.toml", [f'model.path="{five_b[0]}"'])
    family = get_family(recipe.model)
    shapes = {
        (w, h, f)
        for ds in recipe.data.datasets
        for r in ds.resolutions
        for w, h in bucket_sizes(r, max_ratio=ds.max_aspect_ratio, step=family.bucket_step())
        for f in ds.target_frames
    }
    assert all(w % 32 == 0 and h % 32 == 0 for w, h, _ in shapes)
    family.check_shapes(shapes, "bucket")
    if name == "ti2v_5b_720p":
        assert (1280, 704, 81) in shapes and recipe.train.ti2v == "mixed"
        assert recipe.train.fp8_base and recipe.train.gradient_checkpointing and recipe.data.vae_tiling


def test_flops_formula_counts_the_per_token_time_embedding():
    """trainer/perf.py's formula for this family against PyTorch's FLOP counter on a step of the tiny transformer:
    the time embedding runs once per token (expand_timesteps), not once per sample."""
    preset = perf.ModelPreset("wan22_5b", tiny_transformer_config(in_channels=48, out_channels=48), text_tokens=7)
    recipe = load_recipe(None, ["lora.rank=4", "train.ti2v=i2v"])
    model = build_model(recipe, perf.bench_family(preset, recipe.model), torch.float32)
    latent = (48, 3, 8, 8)
    batch = perf.random_batch(preset, latent, 2, preset.text_tokens)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = flow_loss(model, batch, recipe, [step_generator(0, 0, j) for j in range(2)])
        forward = counter.get_total_flops()
        loss.backward()
    formula = perf.step_flops(preset, latent, batch_size=2, lora_rank=4, lora_targets=recipe.lora.targets)
    assert forward == formula.forward and counter.get_total_flops() - forward == formula.backward


def test_the_benchmarks_bare_step_calls_the_transformer_as_the_pipeline_does():
    """scripts/bench_train.py's diffusers-only step passes this model one timestep per token, like the family."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts/bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    preset = perf.ModelPreset("wan22_5b", tiny_transformer_config(in_channels=48, out_channels=48), text_tokens=7)
    family = perf.bench_family(preset, load_recipe(None).model)
    transformer = family.load_transformer(torch.float32)
    batch = perf.random_batch(preset, (48, 3, 8, 8), 2, preset.text_tokens)
    noisy = torch.randn(2, 48, 3, 8, 8)
    bare = transformer_inputs(
        transformer, lambda: bench.bare_forward(preset, transformer, noisy, torch.tensor([500.0, 300.0]), batch)
    )
    ours = transformer_inputs(transformer, lambda: family.predict(transformer, noisy, torch.tensor([0.5, 0.3]), batch))
    assert bare["timestep"].shape == (2, 3 * 4 * 4) and torch.equal(bare["timestep"], ours["timestep"])


def eval_loss(family, transformer, batch, train) -> float:
    """The masked flow loss at fixed noise levels and noise, in the recipe's mode: comparable before and after."""
    losses = []
    with torch.no_grad():
        for i, s in enumerate([0.2, 0.4, 0.6, 0.8]):
            g = torch.Generator().manual_seed(100 + i)
            noisy, target = noisy_and_target(batch["latents"], torch.tensor([s]), g)
            drawn = {**batch, **family.draw_conditions(train, [g])}
            pred = family.predict(transformer, noisy, torch.tensor([s]), drawn)
            losses.append(flow_mse(pred, target, family.loss_weight(drawn)).item())
    return sum(losses) / len(losses)


def run_recipe(five_b, tmp_path, name: str, steps: int, **train) -> object:
    model, cache = five_b
    text = recipe_text(model, cache, tmp_path / name, steps, family="wan22_5b", **train)
    return write_recipe(tmp_path / f"{name}.toml", text)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_training_on_one_clip_lowers_the_loss(five_b, tmp_path, mode):
    recipe = load_recipe(run_recipe(five_b, tmp_path, mode, 30, ti2v=mode, learning_rate=1e-2, checkpoint_every=30))
    run, trained = train_capturing(recipe)
    family = get_family(recipe.model)
    batch, _ = cached_batch(five_b, family)
    before = eval_loss(family, family.load_transformer(torch.float32), batch, recipe.train)
    after = eval_loss(family, trained.eval(), batch, recipe.train)
    # The tiny model's rank-4 LoRA levels off near 0.83 of the start on this clip; 30 steps get most of the way.
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_mixed_run_validates_in_both_modes_and_its_exports_load_in_diffusers(five_b, tmp_path):
    model, _ = five_b
    path = run_recipe(five_b, tmp_path, "mixed", 4, ti2v="mixed", checkpoint_every=4)
    first = five_b[1].parent / "first.png"
    validation = f'[validation]\nevery = 4\nnum_frames = 5\ninference_steps = 2\nimages = ["{first}"]\n'
    text = path.read_text().replace("[export]", '[export]\nformats = ["diffusers", "comfyui", "kohya"]')
    recipe = load_recipe(write_recipe(path, text + validation))
    run, trained = train_capturing(recipe)
    videos = sorted(p.name for p in (run / "validation/step-000004").glob("*.mp4"))
    assert videos == ["00-a_yellow_star_spins_slowly-i2v.mp4", "00-a_yellow_star_spins_slowly-t2v.mp4"]
    for video in videos:
        info = media.probe(run / "validation/step-000004" / video)
        assert info.num_frames == 5 and round(info.fps) == 24

    family = get_family(recipe.model)
    batch, _ = cached_batch(five_b, family)
    batch = {**batch, "first_frame": torch.tensor([True])}  # the image-to-video call
    shape = batch["latents"].shape
    for fmt in ("diffusers", "comfyui", "kohya"):
        file = run / ("pytorch_lora_weights.safetensors" if fmt == "diffusers" else f"mixed_{fmt}.safetensors")
        assert file.is_file(), sorted(p.name for p in run.iterdir())
        assert_diffusers_reproduces(WanPipeline, model, file, family, trained, shape, batch)
    assert_diffusers_reproduces(
        WanImageToVideoPipeline, model, run / "pytorch_lora_weights.safetensors", family, trained, shape, batch
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)

    # `vidlora sample --image`: the size from the recipe's bucket, 24 fps
    out = sample(recipe, CAPTION, tmp_path / "s.mp4", run, frames=5, steps=2, image=first)
    info = media.probe(out)
    assert (info.width, info.height, info.num_frames) == (64, 64, 5) and round(info.fps) == 24
