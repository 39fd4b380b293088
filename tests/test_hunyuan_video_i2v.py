"""HunyuanVideo-I2V on the seam: the cached first-frame latent, the text cached per (caption, first frame) and the
training forward reproduce what HunyuanVideoImageToVideoPipeline feeds its transformer (both released variants), and
make-tiny -> prepare -> train -> export -> load_lora_weights -> sample --image runs end to end with the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import HunyuanVideoImageToVideoPipeline

from data import media, synth
from data.buckets import resize_crop
from data.cache import load_entry, read_meta
from data.dataset import CachedDataset
from data.media import probe, read_frames
from data.prepare import prepare
from tests.conftest import assert_diffusers_reproduces, fixed_eval_loss, run_cli, train_capturing, write_recipe
from tests.test_hunyuan_video import capture_step0
from trainer.config import ModelSection, RecipeError, UserError, load_recipe
from trainer.models import get_family
from trainer.models.hunyuan_video_i2v import HunyuanVideoI2V
from trainer.validation import Validator

CAPTION = "a cat walks on the grass"


@pytest.fixture(scope="module")
def tiny_hvi2v(tmp_path_factory):
    """The default released variant (token replacement), written by the real `vidlora make-tiny`."""
    out = tmp_path_factory.mktemp("models") / "hunyuan_video_i2v"
    run_cli("make-tiny", "hunyuan_video_i2v", out)
    return out


@pytest.mark.parametrize("condition", ["token_replace", "latent_concat"])
def test_condition_text_and_forward_equal_the_pipeline(tiny_hvi2v, tmp_path, condition):
    folder = tiny_hvi2v
    if condition == "latent_concat":
        folder = HunyuanVideoI2V.make_tiny(tmp_path / "hvi2v_33ch", condition="latent_concat")
    family = get_family(ModelSection(family="hunyuan_video_i2v", path=str(folder), guidance=6.0))
    assert family.condition_type == condition
    frames = synth.pattern_frames(9, 48, 32, seed=2)  # [F, H, W, 3] uint8, as prepare decodes a window
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        cached = family.encode_video(family.load_vae().eval(), pixels)
    assert cached["image_latents"].shape == (1, 4, 1, 4, 6)  # the first frame alone, not the clip's first latent
    assert not torch.allclose(cached["image_latents"], cached["latents"][:, :, :1], atol=1e-3)
    text_pipe = family.load_text_pipeline()
    assert text_pipe.transformer is None and text_pipe.vae is None
    other = synth.pattern_frames(1, 48, 32, seed=3)[0]
    text, with_other = family.encode_prompts(text_pipe, [CAPTION, CAPTION], [frames[0], other])
    # The first frame is part of the text: another picture, other tokens (the CLIP-text pooling is the caption's).
    assert not torch.allclose(text["prompt_embeds"], with_other["prompt_embeds"])
    assert torch.equal(text["pooled_projections"], with_other["pooled_projections"])

    media.write_image(tmp_path / "first.png", frames[0])
    call = dict(prompt=CAPTION, height=32, width=48, num_frames=9, guidance_scale=6.0)
    call.update(family.sample_kwargs(tmp_path / "first.png", 32, 48))
    assert np.array_equal(np.asarray(call["image"]), frames[0])
    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(folder)
    step0 = capture_step0(pipe, **call)
    # The image tokens (16 from the tiny CLIP tower, every 4th / 2nd kept) then the caption's 6 words, valid only.
    valid = int(step0["encoder_attention_mask"].sum())
    assert valid == text["prompt_embeds"].shape[0] == (4 if condition == "token_replace" else 8) + 6
    assert torch.equal(step0["encoder_hidden_states"][0, :valid], text["prompt_embeds"])
    assert torch.equal(step0["pooled_projections"][0], text["pooled_projections"])
    hidden = step0["hidden_states"]
    if condition == "token_replace":  # latent frame 0 is the clean first-frame latent, the others the noise
        assert hidden.shape[1] == 4 and torch.equal(hidden[:, :, :1], cached["image_latents"])
        noisy = torch.cat([torch.randn_like(hidden[:, :, :1]), hidden[:, :, 1:]], dim=2)  # frame 0 is replaced
        assert step0["guidance"].item() == 6000.0
    else:  # [noise 4 | first-frame latent on frame 0, zeros | mask 1 on frame 0]
        assert hidden.shape[1] == 9 and torch.equal(hidden[:, 4:8, :1], cached["image_latents"])
        assert not hidden[:, 4:8, 1:].any() and hidden[:, 8, 0].eq(1).all() and not hidden[:, 8, 1:].any()
        noisy = hidden[:, :4]
        assert step0["guidance"] is None  # the 33-channel model has no guidance input
    batch = {**family.collate_text([text]), "image_latents": cached["image_latents"]}
    with torch.no_grad():
        expected = pipe.transformer(**step0)[0]
        got = family.predict(pipe.transformer, noisy, step0["timestep"] / 1000, batch)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # The loss covers what the pipeline integrates: not the given frame of token replacement.
    weight = family.loss_weight({"latents": got})
    assert (weight is None) == (condition == "latent_concat")
    if weight is not None:
        assert weight.flatten().tolist() == [0.0, 1.0, 1.0]


def test_inputs_the_model_does_not_take_are_refused(tiny_hvi2v, tmp_path):
    family = get_family(ModelSection(family="hunyuan_video_i2v", path=str(tiny_hvi2v)))
    with pytest.raises(UserError, match="generates from a first frame: pass --image"):
        family.sample_kwargs(None, 32, 48)
    with pytest.raises(UserError, match=r"1 frames: .*token replacement"):
        family.check_shapes([(48, 32, 1)], "bucket")
    folder = HunyuanVideoI2V.make_tiny(tmp_path / "hvi2v_33ch", condition="latent_concat")
    family = get_family(ModelSection(family="hunyuan_video_i2v", path=str(folder), guidance=1.0))
    family.check_shapes([(48, 32, 1)], "bucket")  # a still only repeats its condition, but it runs
    with pytest.raises(RecipeError, match="no guidance input"):
        family.load_transformer(torch.float32)


def report(cache) -> dict:
    return json.loads((cache / "report.json").read_text())


@pytest.mark.slow
def test_prepare_train_export_round_trip_and_sample(tmp_path, tiny_hvi2v):
    clips = tmp_path / "clips"
    media.write_video(clips / "clip.mp4", synth.pattern_frames(12, 64, 48, seed=7), fps=24)
    (clips / "clip.txt").write_text("a blue square moves left over a gradient\n", encoding="utf-8")
    media.write_image(tmp_path / "first.png", synth.pattern_frames(1, 80, 60, seed=9)[0])
    # Both windows start at frame 0 (one text entry for the two); the targets leave out the single blocks' fused
    # linear1, which diffusers' loader can only split at the real hidden size (3072).
    recipe_path = write_recipe(
        tmp_path / "r.toml",
        f"""
[model]
family = "hunyuan_video_i2v"
path = "{tiny_hvi2v}"
[data]
cache_dir = "{tmp_path / "cache"}"
cache_dtype = "fp32"
decode_workers = 0
validation_prompts = ["{CAPTION}"]
[[data.datasets]]
path = "{clips}"
resolutions = [48]
target_frames = [5, 9]
frame_window = "head"
[lora]
rank = 8
alpha = 8
targets = 'transformer_blocks\\.\\d+\\.(attn\\.(to_q|to_k|to_v|to_out\\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|(ff|ff_context)\\.net\\.(0\\.proj|2))|single_transformer_blocks\\.\\d+\\.proj_out'
[validation]
every = 40
num_frames = 5
inference_steps = 2
images = ["{tmp_path / "first.png"}"]
[train]
output_dir = "{tmp_path / "run"}"
max_steps = 40
learning_rate = 5e-3
checkpoint_every = 40
dataloader_workers = 0
[logging]
wandb = false
""",
    )
    run_cli("prepare", recipe_path)
    cache = tmp_path / "cache"
    index = json.loads((cache / "index.json").read_text())
    assert [len(s["frames"]) for s in index["samples"]] == [5, 9]
    assert index["samples"][0]["text_ids"] == index["samples"][1]["text_ids"]  # same caption, same first frame
    sample = index["samples"][1]
    width, height = sample["bucket"]
    entry = load_entry(cache / sample["file"])
    assert set(entry) == {"latents", "image_latents"}
    assert entry["image_latents"].shape == (4, 1, height // 8, width // 8)
    text_file = cache / "text" / f"{sample['text_ids'][0]}.safetensors"
    text = load_entry(text_file)
    meta = read_meta(text_file)
    assert meta["image"]["source"].endswith("clip.mp4") and meta["image"]["frame"] == sample["frames"][0]
    # The cached text is LLaVA's reading of the caption with the window's first frame as the VAE pass decoded it
    # (the whole window, resized; the text pass decodes that one frame again).
    family = get_family(load_recipe(recipe_path).model)
    first = resize_crop(read_frames(probe(clips / "clip.mp4"), sample["frames"]), (width, height))[0]
    again = family.encode_prompts(family.load_text_pipeline(), [meta["caption"]], [first])[0]
    assert torch.equal(again["prompt_embeds"], text["prompt_embeds"])

    recipe = load_recipe(recipe_path)
    run, trained = train_capturing(recipe)
    trained.eval()
    videos = list((run / "validation" / "step-000040").glob("*.mp4"))  # from the given first frame
    assert len(videos) == 1 and probe(videos[0]).num_frames == 5

    base = family.load_transformer(torch.float32)
    batch = {**family.collate_text([text]), "image_latents": entry["image_latents"][None]}
    before = fixed_eval_loss(family, base, entry["latents"][None], batch)
    after = fixed_eval_loss(family, trained, entry["latents"][None], batch)
    assert after < 0.75 * before, (before, after)

    out = tmp_path / "exports"
    run_cli("export", run, "--format", "all", "--out-dir", out, "--name", "hvi2v", "--dtype", "fp32")
    for fmt in ("diffusers", "comfyui"):  # diffusers has no reader for HunyuanVideo kohya files (lora_reader_notes)
        assert_diffusers_reproduces(
            HunyuanVideoImageToVideoPipeline, tiny_hvi2v, out / f"hvi2v_{fmt}.safetensors", family, trained,
            entry["latents"][None].shape, batch,
        )  # fmt: skip

    video = tmp_path / "sample.mp4"
    args = ["--prompt", "a blue square", "--frames", "5", "--height", "32", "--width", "48", "--steps", "2"]
    run_cli("sample", recipe_path, *args, "--lora", out / "hvi2v_diffusers.safetensors", "--image", tmp_path / "first.png",
            "--out", video)  # fmt: skip
    info = probe(video)
    assert (info.width, info.height, info.num_frames) == (48, 32, 5) and round(info.fps) == 24

    # The cache keys text by (caption, first frame): nothing changed, nothing is encoded again ...
    assert prepare(recipe, family) == 0
    assert (report(cache)["encoded_now"], report(cache)["texts_encoded_now"]) == (0, 0)
    # ... a new caption is one new text entry (both windows share it), no new latents ...
    (clips / "clip.txt").write_text("a blue square moves right\n", encoding="utf-8")
    assert prepare(recipe, family) == 0
    assert (report(cache)["encoded_now"], report(cache)["texts_encoded_now"]) == (0, 1)
    # ... and a new clip under the same name (another first frame) re-encodes its latents and its text.
    media.write_video(clips / "clip.mp4", synth.pattern_frames(12, 64, 48, seed=8), fps=24)
    assert prepare(recipe, family) == 0
    assert (report(cache)["encoded_now"], report(cache)["texts_encoded_now"]) == (2, 1)

    # Validation videos need the image the prompts were encoded with; a changed one is caught before training.
    media.write_image(tmp_path / "other.png", synth.pattern_frames(1, 80, 60, seed=10)[0])
    other = load_recipe(recipe_path, [f'validation.images=["{tmp_path / "other.png"}"]'])
    with pytest.raises(UserError, match="validation prompt 1 was encoded .* re-run `vidlora prepare`"):
        Validator(other, family, CachedDataset(cache), Accelerator(cpu=True), tmp_path / "run2")
    with pytest.raises(UserError, match="validation.images: the hunyuan_video_i2v text encoder reads each"):
        prepare(load_recipe(recipe_path, ["validation.images=[]"]), family)
