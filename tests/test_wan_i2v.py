"""Wan 2.1 I2V on the seam: the cached first-frame condition and the training forward reproduce what
WanImageToVideoPipeline feeds its transformer, and make-tiny -> prepare -> train -> export ->
WanImageToVideoPipeline.load_lora_weights -> sample --image runs end to end on real clips with the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from data import media, synth
from data.cache import load_entry
from data.media import probe
from tests.conftest import assert_diffusers_reproduces, fixed_eval_loss, run_cli, train_capturing, write_recipe
from tests.test_hunyuan_video import capture_step0
from trainer.config import ModelSection, UserError, load_recipe
from trainer.models import get_family
from trainer.sample import sample


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "wan_i2v"
    run_cli("make-tiny", "wan_i2v", out)
    return out


def test_condition_and_forward_equal_the_pipeline(tiny_i2v):
    family = get_family(ModelSection(family="wan_i2v", path=str(tiny_i2v)))
    frames = synth.pattern_frames(9, 48, 32, seed=2)  # [F, H, W, 3] uint8, as prepare decodes a window
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    vae_pass = family.load_vae().eval()
    with torch.no_grad():
        cached = family.encode_video(vae_pass, pixels)
    assert cached["latents"].shape == (1, 16, 3, 4, 6) and cached["condition_latents"].shape == (1, 16, 3, 4, 6)
    assert cached["image_embeds"].shape == (1, 65, 16)  # CLIP's penultimate hidden states of the first frame
    text_pipe = family.load_text_pipeline()
    assert text_pipe.vae is None and text_pipe.image_encoder is None
    text = family.collate_text(family.encode_prompts(text_pipe, ["a cat walks on the grass"]))
    assert text["prompt_embeds"].shape[1] == 512  # the I2V attention hard-codes 512 text tokens

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_i2v)
    image = Image.fromarray(frames[0])
    call = dict(image=image, prompt="a cat walks on the grass", height=32, width=48, num_frames=9, guidance_scale=1.0)
    step0 = capture_step0(pipe, **call)
    # [noise 16 | mask 4 | condition latent 16]: the pipeline's condition equals the cached one.
    hidden = step0["hidden_states"]
    assert torch.allclose(hidden[:, 20:], cached["condition_latents"], atol=1e-5)
    assert torch.equal(hidden[:, 16:20, 0], torch.ones_like(hidden[:, 16:20, 0])) and not hidden[:, 16:20, 1:].any()
    assert torch.allclose(step0["encoder_hidden_states_image"], cached["image_embeds"], atol=1e-6)
    assert torch.allclose(step0["encoder_hidden_states"], text["prompt_embeds"], atol=1e-6)

    batch = {**text, "image_embeds": cached["image_embeds"], "condition_latents": cached["condition_latents"]}
    with torch.no_grad():
        expected = pipe.transformer(**step0)[0]
        got = family.predict(pipe.transformer, hidden[:, :16], step0["timestep"] / 1000, batch)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.slow
def test_prepare_train_export_round_trip_and_sample(tmp_path, tiny_i2v, monkeypatch):
    clips = tmp_path / "clips"
    media.write_video(clips / "clip.mp4", synth.pattern_frames(12, 64, 48, seed=7), fps=16)
    media.write_image(tmp_path / "first.png", synth.pattern_frames(1, 80, 60, seed=9)[0])
    (clips / "clip.txt").write_text("a blue square moves left over a gradient\n", encoding="utf-8")
    recipe_path = write_recipe(
        tmp_path / "r.toml",
        f"""
[model]
family = "wan_i2v"
path = "{tiny_i2v}"
[data]
cache_dir = "{tmp_path / "cache"}"
cache_dtype = "fp32"
decode_workers = 0
validation_prompts = ["a red car drives through a city street at night"]
[[data.datasets]]
path = "{clips}"
resolutions = [48]
target_frames = [9]
[lora]
rank = 8
alpha = 8
[validation]
every = 60
num_frames = 5
inference_steps = 2
images = ["{tmp_path / "first.png"}"]
[train]
output_dir = "{tmp_path / "run"}"
max_steps = 60
learning_rate = 5e-3
checkpoint_every = 60
dataloader_workers = 0
[logging]
wandb = false
""",
    )
    run_cli("prepare", recipe_path)
    index = json.loads((tmp_path / "cache/index.json").read_text())
    assert len(index["samples"]) == 1
    width, height = index["samples"][0]["bucket"]
    entry = load_entry(next((tmp_path / "cache/samples").rglob("*.safetensors")))
    assert set(entry) == {"latents", "image_embeds", "condition_latents"}
    assert entry["condition_latents"].shape == entry["latents"].shape == (16, 3, height // 8, width // 8)
    text = load_entry(tmp_path / "cache/text" / f"{index['samples'][0]['text_ids'][0]}.safetensors")

    recipe = load_recipe(recipe_path)
    run, trained = train_capturing(recipe)
    trained.eval()
    # The validation video at the last step: made by WanImageToVideoPipeline from the given first frame.
    videos = list((run / "validation" / "step-000060").glob("*.mp4"))
    assert len(videos) == 1 and probe(videos[0]).num_frames == 5
    assert any("attn2.add_k_proj.lora_A" in n for n, _ in trained.named_parameters())  # the image keys train too

    family = get_family(recipe.model)
    base = family.load_transformer(torch.float32)
    batch = {**family.collate_text([text]), **{k: entry[k][None] for k in ("image_embeds", "condition_latents")}}
    before = fixed_eval_loss(family, base, entry["latents"][None], batch)
    after = fixed_eval_loss(family, trained, entry["latents"][None], batch)
    # The tiny model's LoRA bottoms out near 0.73 of the start here (the first frame is given, so the start is
    # lower than for T2V): 60 steps get there.
    assert after < 0.8 * before, (before, after)

    out = tmp_path / "exported.safetensors"
    run_cli("export", run, "--out", out, "--dtype", "fp32")
    assert_diffusers_reproduces(
        WanImageToVideoPipeline, tiny_i2v, out, family, trained, entry["latents"][None].shape, batch
    )

    # Sampling needs a first frame (asked for before anything loads); any image size works: it is resized and
    # cropped like training frames.
    with pytest.raises(UserError, match="pass --image"):
        family.sample_kwargs(None, 32, 48)
    first = tmp_path / "first.png"
    media.write_image(first, synth.pattern_frames(1, 80, 60, seed=7)[0])
    video = tmp_path / "sample.mp4"
    args = ["--prompt", "a blue square", "--frames", "5", "--height", "32", "--width", "48", "--steps", "2"]
    run_cli("sample", recipe_path, *args, "--lora", out, "--image", first, "--out", video)
    info = probe(video)
    assert (info.width, info.height, info.num_frames) == (48, 32, 5) and round(info.fps) == 16


def test_sample_takes_a_phone_still_upright_and_runs_clip_in_fp32(tmp_path, tiny_i2v, monkeypatch):
    """A phone photo is stored landscape with EXIF orientation 6 (turn 90° clockwise to display): the pipeline
    must get it upright, as prepare decodes training stills, and run CLIP in fp32 as prepare cached it."""
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)  # the stored left edge is the displayed top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert probe(tmp_path / "phone.jpg").rotation == 90
    recipe = write_recipe(tmp_path / "r.toml", f'[model]\nfamily = "wan_i2v"\npath = "{tiny_i2v}"\ndtype = "bf16"\n')
    seen = {}
    real_call = WanImageToVideoPipeline.__call__

    def spy(pipe, *args, **kwargs):  # the real pipeline runs; the spy only records its input
        seen["image"], seen["clip"] = np.asarray(kwargs["image"]), pipe.image_encoder.dtype
        seen["transformer"] = pipe.transformer.dtype
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(WanImageToVideoPipeline, "__call__", spy)
    out = sample(load_recipe(recipe), "a cat", tmp_path / "s.mp4", frames=5, height=64, width=48, steps=1,
                 image=tmp_path / "phone.jpg")  # fmt: skip
    assert probe(out).num_frames == 5
    image = seen["image"].astype(int)
    assert image.shape == (64, 48, 3)
    assert (image[:12, :, 0] > 200).all() and (image[:12, :, 1] < 60).all()  # red across the top
    assert (image[20:].max() < 60).all()  # dark below: not the stored (sideways) picture
    assert seen["clip"] == torch.float32 and seen["transformer"] == torch.bfloat16
