"""HunyuanVideo 1.5 on the seam: the cached text (Qwen2.5-VL + byT5), the cached first-frame condition (SigLIP tokens,
image latent) and the training forward reproduce what HunyuanVideo15Pipeline / ...ImageToVideoPipeline feed their
transformer; make-tiny -> prepare -> train (with validation videos) -> export, and
every exported file loads with diffusers' own `transformer.load_lora_adapter` and gives the trained transformer's
outputs; the original checkpoint layouts (Tencent's, ComfyUI's) load equal to the diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel
from safetensors.torch import save_file

from data import media, synth
from data.cache import load_entry
from data.media import probe
from tests import comfyui_rules as comfy
from tests.conftest import fixed_eval_loss, run_cli, train_capturing, write_recipe
from tests.test_single_file import assert_same_model, folder_with
from tests.training_setup import prepare_cache, recipe_text
from trainer.config import ModelSection, load_recipe
from trainer.formats import convert, load_lora, save_lora
from trainer.models import get_family
from trainer.models.hunyuan_video15 import HunyuanVideo15, tiny_transformer_config
from trainer.models.hunyuan_video15_i2v import HunyuanVideo15I2V
from trainer.sample import sample

PROMPTS = ["a cat walks on the grass", 'a red car drives through a city street at night with a sign "open"']


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory):
    return HunyuanVideo15.make_tiny(tmp_path_factory.mktemp("models") / "hunyuan_video15")


def transformer_calls(family, pipe, **call) -> list[dict]:
    """Every set of arguments the pipeline passes its transformer in one denoising step (conditional first)."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        family.run_pipeline(
            pipe, **call, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)
        )
    finally:
        hook.remove()
    return seen


def assert_predicts(family, transformer, call: dict, batch: dict, latent_channels: int) -> None:
    """The training forward on `batch` gives the transformer's output for the pipeline's arguments `call`."""
    with torch.no_grad():
        expected = transformer(**call)[0]
        got = family.predict(transformer, call["hidden_states"][:, :latent_channels], call["timestep"] / 1000, batch)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_text_cache_and_forward_equal_the_pipeline(tiny_t2v):
    family = get_family(ModelSection(family="hunyuan_video15", path=str(tiny_t2v)))
    text_pipe = family.load_text_pipeline()
    assert text_pipe.transformer is None and text_pipe.vae is None
    items = family.encode_prompts(text_pipe, [*PROMPTS, ""])
    # Qwen: the caption's tokens after the chat template's 108-token prefix, then the assistant header (5 tokens).
    assert items[0]["prompt_embeds"].shape == (len(text_pipe.tokenizer(PROMPTS[0]).input_ids) + 5, 16)
    # byT5 reads only quoted text, in the pipeline's `Text "...". ` form.
    assert items[0]["prompt_embeds_2"].shape == (0, 32)
    assert items[1]["prompt_embeds_2"].shape == (len(text_pipe.tokenizer_2('Text "open". ').input_ids), 32)

    pipe = HunyuanVideo15Pipeline.from_pretrained(tiny_t2v)
    for i in (0, 1):
        cond, uncond = transformer_calls(
            family, pipe, prompt=PROMPTS[i], height=32, width=48, num_frames=9, guidance_scale=6.0
        )
        # The pipeline pads Qwen to 1000 and byT5 to 256 tokens and adds 729 zero image tokens, all masked.
        assert cond["encoder_hidden_states"].shape[1] == 1000 and cond["image_embeds"].shape[1] == 729
        assert int(cond["encoder_attention_mask"].sum()) == items[i]["prompt_embeds"].shape[0]
        assert_predicts(family, pipe.transformer, cond, family.collate_text([items[i]]), 4)
        # The unconditional pass is the empty negative prompt, which prepare caches for validation videos.
        assert_predicts(family, pipe.transformer, uncond, family.collate_text([items[2]]), 4)

    # A batch pads each stream on the right and masks it: the captions' predictions do not change.
    noisy = torch.randn(2, 4, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        batched = family.predict(pipe.transformer, noisy, sigmas, family.collate_text(items[:2]))
        for i in (0, 1):
            alone = family.predict(
                pipe.transformer, noisy[i : i + 1], sigmas[i : i + 1], family.collate_text([items[i]])
            )
            assert torch.allclose(batched[i], alone[0], atol=1e-5)


def test_lora_presets_train_the_double_blocks_only(tiny_t2v):
    from peft import LoraConfig

    from trainer.train import lora_targets

    family = get_family(ModelSection(family="hunyuan_video15", path=str(tiny_t2v)))
    transformer = family.load_transformer(torch.float32)
    transformer.add_adapter(LoraConfig(r=2, target_modules=lora_targets(family, "default")))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == 12  # one double block: 8 attention projections + 4 MLP layers
    assert {n.split(".")[0] for n in wrapped} == {"transformer_blocks"} and not [n for n in wrapped if "norm" in n]


def to_original(ref: torch.nn.Module, fused: bool) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights in the original layout: ComfyUI's repackaged one (each double block's q, k, v
    fused), or Tencent's (split); built through the stand-in's transcription of diffusers' conversion script."""
    cfg = ref.config
    names = comfy.hunyuan_video15_original_weights(cfg.num_layers, cfg.num_refiner_layers)
    if not fused:
        split = [n for n in names if n.startswith("double_blocks.") and "_attn_qkv." in n]
        names = [n for n in names if n not in split] + [n.replace("_qkv.", f"_{x}.") for n in split for x in "qkv"]
    sd, out = ref.state_dict(), {}
    for name in names:
        parts = comfy.hunyuan_video15_to_diffusers({name: torch.zeros(3, 1)})  # the diffusers tensors it holds
        value = torch.cat([sd[p] for p in parts])
        if name.startswith("final_layer.adaLN_modulation"):
            scale, shift = value.chunk(2)
            value = torch.cat([shift, scale])
        out[name] = value.clone()
    return out


def test_original_checkpoints_load_equal_to_the_diffusers_folder(tmp_path):
    """diffusers cannot load this transformer from one file: the family converts Tencent's layout and ComfyUI's."""
    cfg = tiny_transformer_config(num_layers=2, num_refiner_layers=2)
    torch.manual_seed(0)
    ref = HunyuanVideo15Transformer3DModel(**cfg).eval()
    path = folder_with(tmp_path, ref)
    tencent, comfyui = to_original(ref, fused=False), to_original(ref, fused=True)
    assert "double_blocks.1.img_attn_k.weight" in tencent and "double_blocks.1.img_attn_qkv.weight" in comfyui
    save_file(tencent, tmp_path / "tencent.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in comfyui.items()}, tmp_path / "comfyui.safetensors")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, cfg["in_channels"], 2, 2, 2, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, cfg["text_embed_dim"], generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0]]),
        "encoder_hidden_states_2": torch.randn(1, 2, cfg["text_embed_2_dim"], generator=g),
        "encoder_attention_mask_2": torch.tensor([[1, 0]]),
        "image_embeds": torch.randn(1, 3, cfg["image_embed_dim"], generator=g),
    }
    for file in ("tencent", "comfyui"):
        section = ModelSection(
            family="hunyuan_video15", path=path, transformer_file=str(tmp_path / f"{file}.safetensors")
        )
        assert_same_model(ref, get_family(section).load_transformer(torch.float32), inputs)


@pytest.mark.slow
def test_prepare_train_export_round_trip_and_sample(tmp_path, tiny_t2v):
    model, cache = prepare_cache(tmp_path, tiny_t2v, family="hunyuan_video15")
    text = recipe_text(model, cache, tmp_path / "run", steps=30, family="hunyuan_video15", learning_rate=5e-3)
    text += "[validation]\nevery = 30\nnum_frames = 5\ninference_steps = 2\n"
    recipe = load_recipe(write_recipe(tmp_path / "train.toml", text))
    run, trained = train_capturing(recipe)
    trained.eval()
    # A validation video with classifier-free guidance against the cached empty negative prompt.
    videos = list((run / "validation" / "step-000030").glob("*.mp4"))
    assert len(videos) == 1 and probe(videos[0]).num_frames == 5

    family = get_family(recipe.model)
    first = json.loads((cache / "index.json").read_text())["samples"][0]
    latents = load_entry(cache / first["file"])["latents"][None]
    batch = family.collate_text([load_entry(cache / "text" / f"{first['text_ids'][0]}.safetensors")])
    assert latents.shape == (1, 4, 3, 4, 4)  # 64x64x9 through 16x16 pixels and 4 frames per latent
    before = fixed_eval_loss(family, family.load_transformer(torch.float32), latents, batch)
    after = fixed_eval_loss(family, trained, latents, batch)
    assert after < 0.75 * before, (before, after)

    # Every exported file through diffusers' own loader (comfyui and kohya converted back to diffusers first).
    run_cli("export", run, "--format", "all", "--out-dir", tmp_path / "exports", "--dtype", "fp32")
    files = [tmp_path / "exports/run_diffusers.safetensors"]
    for fmt in ("comfyui", "kohya"):
        files.append(tmp_path / f"{fmt}_as_diffusers.safetensors")
        sd, header = load_lora(tmp_path / f"exports/run_{fmt}.safetensors")
        family_name = header["family"]  # the exports' headers name the family, as HunyuanVideo 13B shares names
        save_lora(files[-1], convert(sd, "diffusers", family_name), {"family": family_name})
    noisy = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.5])
    with torch.no_grad():
        expected = family.predict(trained, noisy, sigmas, batch)
    for file in files:
        pipe = HunyuanVideo15Pipeline.from_pretrained(tiny_t2v)
        pipe.transformer.load_lora_adapter(str(file), prefix="transformer")  # the snippet of docs/export.md
        with torch.no_grad():
            got = family.predict(pipe.transformer, noisy, sigmas, batch)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (file.name, (got - expected).abs().max())

    # `vidlora sample --lora RUN`: the family's loader and guider, in the real pipeline.
    video = sample(recipe, "a dog runs", tmp_path / "sample.mp4", lora=run, frames=5, height=32, width=48, steps=2)
    info = probe(video)
    assert (info.width, info.height, info.num_frames) == (48, 32, 5) and round(info.fps) == 24


# --- image-to-video --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    return HunyuanVideo15I2V.make_tiny(tmp_path_factory.mktemp("models") / "hunyuan_video15_i2v")


def test_i2v_condition_and_forward_equal_the_pipeline(tiny_i2v, tmp_path):
    """The condition prepare caches from a window's first frame (SigLIP tokens, the image's latent) and the training
    forward equal what HunyuanVideo15ImageToVideoPipeline feeds its transformer for that frame as the input image."""
    family = get_family(ModelSection(family="hunyuan_video15_i2v", path=str(tiny_i2v)))
    frames = synth.pattern_frames(9, 64, 64, seed=3)  # uint8 [F, H, W, 3], as prepare decodes a window
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        cached = family.encode_video(family.load_vae().eval(), pixels)
    assert cached["condition_latents"].shape == (1, 4, 1, 4, 4) and cached["image_embeds"].shape == (1, 16, 12)
    text = family.encode_prompts(family.load_text_pipeline(), [PROMPTS[1], ""])

    image = media.write_image(tmp_path / "first.png", frames[0])
    call = family.sample_kwargs(image, 64, 64)  # how `vidlora sample --image` and validation read the image
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(tiny_i2v)
    cond, uncond = transformer_calls(family, pipe, prompt=PROMPTS[1], height=64, width=64, num_frames=9, **call)
    assert cond["hidden_states"].shape == (1, 9, 3, 4, 4)  # [noisy 4 | condition 4 | mask 1]: the tiny 64x64 bucket
    conditions = {k: cached[k] for k in ("condition_latents", "image_embeds")}
    assert_predicts(family, pipe.transformer, cond, {**family.collate_text(text[:1]), **conditions}, 4)
    assert_predicts(family, pipe.transformer, uncond, {**family.collate_text(text[1:]), **conditions}, 4)


@pytest.mark.slow
def test_i2v_prepare_train_validate_and_load_in_diffusers(tmp_path, tiny_i2v):
    model, cache = prepare_cache(tmp_path, tiny_i2v, family="hunyuan_video15_i2v")
    entry = load_entry(next((cache / "samples").rglob("*.safetensors")))
    assert set(entry) == {"latents", "condition_latents", "image_embeds"}
    image = media.write_image(tmp_path / "first.png", synth.pattern_frames(1, 64, 64, seed=7)[0])
    text = recipe_text(model, cache, tmp_path / "run", steps=30, family="hunyuan_video15_i2v", learning_rate=5e-3)
    text += f'[validation]\nevery = 30\nnum_frames = 5\ninference_steps = 2\nimages = ["{image}"]\n'
    recipe = load_recipe(write_recipe(tmp_path / "train.toml", text))
    run, trained = train_capturing(recipe)
    trained.eval()
    videos = list((run / "validation" / "step-000030").glob("*.mp4"))
    assert len(videos) == 1 and probe(videos[0]).num_frames == 5

    family = get_family(recipe.model)
    first = json.loads((cache / "index.json").read_text())["samples"][0]
    item = {k: v[None] for k, v in load_entry(cache / first["file"]).items()}
    batch = {**family.collate_text([load_entry(cache / "text" / f"{first['text_ids'][0]}.safetensors")]), **item}
    before = fixed_eval_loss(family, family.load_transformer(torch.float32), item["latents"], batch)
    after = fixed_eval_loss(family, trained, item["latents"], batch)
    assert after < 0.75 * before, (before, after)

    # The run's diffusers file through the transformer's own loader gives the trained outputs.
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(tiny_i2v)
    pipe.transformer.load_lora_adapter(str(run / "pytorch_lora_weights.safetensors"), prefix="transformer")
    noisy = torch.randn(item["latents"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = family.predict(trained, noisy, torch.tensor([0.5]), batch)
        got = family.predict(pipe.transformer, noisy, torch.tensor([0.5]), batch)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()

    # A sample from an image: the pipeline picks its own size (the image's bucket at the model's target_size).
    video = sample(recipe, "a dog runs", tmp_path / "sample.mp4", lora=run, frames=5, steps=2, image=image)
    info = probe(video)
    assert (info.width, info.height, info.num_frames) == (64, 64, 5)
