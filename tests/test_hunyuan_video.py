"""HunyuanVideo on the seam: the cached text and the training forward reproduce what HunyuanVideoPipeline feeds
its transformer, and make-tiny -> prepare -> train -> export -> HunyuanVideoPipeline.load_lora_weights -> sample
runs end to end on real clips with the real CLI."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import HunyuanVideoPipeline

from data import media, synth
from data.cache import load_entry
from data.media import probe
from tests.conftest import assert_diffusers_reproduces, fixed_eval_loss, run_cli, train_capturing, write_recipe
from trainer.config import ModelSection, RecipeError, UserError, load_recipe
from trainer.models import get_family
from trainer.models.hunyuan_video import HunyuanVideo
from trainer.train import lora_targets

PROMPTS = ["a cat walks on the grass", "a red car drives through a city street at night"]


@pytest.fixture(scope="module")
def tiny_hv(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "hunyuan_video"
    run_cli("make-tiny", "hunyuan_video", out)
    return out


def capture_step0(pipe, **call):
    """What the pipeline passes to its transformer at the first denoising step."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(**call, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return seen[0]


def test_text_cache_and_forward_equal_the_pipeline(tiny_hv):
    family = get_family(ModelSection(family="hunyuan_video", path=str(tiny_hv), guidance=6.0))
    text_pipe = family.load_text_pipeline()
    assert text_pipe.transformer is None and text_pipe.vae is None
    items = family.encode_prompts(text_pipe, PROMPTS)
    # Only the valid tokens are cached; the official template is cropped after its prefix (the last token is eot).
    lengths = [i["prompt_embeds"].shape[0] for i in items]
    assert lengths[0] < lengths[1] < family.text_length
    assert items[0]["pooled_projections"].shape == (8,)

    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hv)
    call = dict(prompt=PROMPTS[1], height=32, width=48, num_frames=9, guidance_scale=6.0)
    call.update(family.sample_kwargs(None, 32, 48))
    assert call["prompt_template"]["crop_start"] == 92  # counted on the tiny tokenizer (95 on llava-llama-3)
    step0 = capture_step0(pipe, **call)
    # The pipeline pads to 256 tokens; the cache holds the valid ones, which are the same values (up to the
    # float noise of encoding 2 captions at once instead of 1).
    valid = int(step0["encoder_attention_mask"].sum())
    assert valid == lengths[1]
    assert torch.allclose(step0["encoder_hidden_states"][0, :valid], items[1]["prompt_embeds"], atol=1e-6)
    assert torch.allclose(step0["pooled_projections"][0], items[1]["pooled_projections"], atol=1e-6)

    # The training forward on the cached text (padded per batch) gives the pipeline's step-0 prediction.
    batch = family.collate_text([items[1]])
    sigmas = step0["timestep"] / 1000
    with torch.no_grad():
        expected = pipe.transformer(**step0)[0]
        got = family.predict(pipe.transformer, step0["hidden_states"], sigmas, batch)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    # In a batch the short caption is padded on the right and masked: its prediction does not change.
    both = family.collate_text(items)
    assert both["encoder_attention_mask"].sum(1).tolist() == lengths
    noisy = step0["hidden_states"].repeat(2, 1, 1, 1, 1)
    with torch.no_grad():
        alone = family.predict(pipe.transformer, noisy[:1], sigmas, family.collate_text(items[:1]))
        batched = family.predict(pipe.transformer, noisy, sigmas.repeat(2), both)
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_lora_presets_skip_modulation_and_token_refiner(tiny_hv):
    from peft import LoraConfig

    family = HunyuanVideo(ModelSection(family="hunyuan_video", path=str(tiny_hv)))
    transformer = family.load_transformer(torch.float32)
    transformer.add_adapter(LoraConfig(r=2, target_modules=lora_targets(family, "default")))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == 12 + 5  # one double block: 8 attention + 4 MLP; one single block: q, k, v, mlp, out
    assert not [n for n in wrapped if "norm" in n or "token_refiner" in n]
    assert {n.split(".")[0] for n in wrapped} == {"transformer_blocks", "single_transformer_blocks"}


def test_inputs_a_family_does_not_take_are_refused(tiny_hv):
    with pytest.raises(RecipeError, match="model.guidance.*wan"):
        get_family(ModelSection(family="wan", guidance=3.0))
    with pytest.raises(UserError, match="text only; --image is for image-to-video"):
        get_family(ModelSection(family="hunyuan_video", path=str(tiny_hv))).sample_kwargs("first.png", 32, 48)


@pytest.mark.slow
def test_prepare_train_export_round_trip_and_sample(tmp_path, tiny_hv, monkeypatch):
    clips = tmp_path / "clips"
    media.write_video(clips / "clip.mp4", synth.pattern_frames(12, 64, 48, seed=5), fps=24)
    (clips / "clip.txt").write_text("a dog runs along the beach at sunset\n", encoding="utf-8")
    recipe_path = write_recipe(
        tmp_path / "r.toml",
        f"""
[model]
family = "hunyuan_video"
path = "{tiny_hv}"
[data]
cache_dir = "{tmp_path / "cache"}"
cache_dtype = "fp32"
decode_workers = 0
validation_prompts = ["a cat walks on the grass"]
[[data.datasets]]
path = "{clips}"
resolutions = [48]
target_frames = [9]
[lora]
rank = 8
alpha = 8
[validation]
every = 40
num_frames = 5
inference_steps = 2
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
    report = json.loads((tmp_path / "cache/report.json").read_text())
    assert report["counts"] == {"ok": 1} and report["samples"] == 1
    sample = json.loads((tmp_path / "cache/index.json").read_text())["samples"][0]
    width, height = sample["bucket"]
    entry = load_entry(next((tmp_path / "cache/samples").rglob("*.safetensors")))
    assert entry["latents"].shape == (4, 3, height // 8, width // 8)  # 9 frames -> 3 latent frames
    text = load_entry(tmp_path / "cache/text" / f"{sample['text_ids'][0]}.safetensors")
    assert set(text) == {"prompt_embeds", "pooled_projections"} and text["prompt_embeds"].shape[0] < 256

    recipe = load_recipe(recipe_path)
    run, trained = train_capturing(recipe)
    trained.eval()
    # A validation video at the last step, with the embedded guidance (no negative prompt needed).
    videos = list((run / "validation" / "step-000040").glob("*.mp4"))
    assert len(videos) == 1 and probe(videos[0]).num_frames == 5

    family = get_family(recipe.model)
    base = family.load_transformer(torch.float32)
    batch = family.collate_text([text])
    before = fixed_eval_loss(family, base, entry["latents"][None], batch)
    after = fixed_eval_loss(family, trained, entry["latents"][None], batch)
    assert after < 0.75 * before, (before, after)

    out = tmp_path / "exported.safetensors"
    run_cli("export", run, "--out", out, "--dtype", "fp32")
    assert_diffusers_reproduces(
        HunyuanVideoPipeline, tiny_hv, out, family, trained, entry["latents"][None].shape, batch
    )

    video = tmp_path / "sample.mp4"
    args = ["--prompt", "a dog runs", "--frames", "5", "--height", "32", "--width", "48", "--steps", "2"]
    run_cli("sample", recipe_path, *args, "--lora", out, "--out", video)
    info = probe(video)
    assert (info.width, info.height, info.num_frames) == (48, 32, 5) and round(info.fps) == 24
