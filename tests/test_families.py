"""What every registered family must do the same way, checked on each family's own tiny model."""

from __future__ import annotations

import pytest
import torch

from data import synth
from trainer.config import ModelSection
from trainer.models import FAMILIES, family_class, get_family


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = family_class(request.param).make_tiny(tmp_path_factory.mktemp(request.param))
    return get_family(ModelSection(family=request.param, path=str(folder)))


def test_decode_video_inverts_the_cached_latent_scaling(family):
    """`vidlora inspect` shows what the model sees: decoding cached latents equals the VAE decoding its raw ones."""
    vae = family.load_vae().eval()
    raw_vae = family.vae_module(vae)  # Wan I2V's VAE pass also holds the CLIP image encoder
    pixels = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        cached = family.encode_video(vae, pixels)["latents"]
        raw = raw_vae.encode(pixels).latent_dist.mode()
        assert not torch.allclose(cached, raw)
        decoded = family.decode_video(vae, cached)
        assert decoded.shape == pixels.shape
        assert torch.allclose(decoded, raw_vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)


def test_presets_and_defaults_are_declared(family):
    assert "default" in family.lora_presets and family.default_shift > 0 and family.native_fps > 0


def test_cache_identity_covers_every_component_that_makes_a_cache(family):
    """Editing any folder whose weights make latents or text embeddings (the I2V image encoder, HunyuanVideo's
    second text encoder...) makes the cache entries stale."""
    import os
    from pathlib import Path

    from data.prepare import model_identity

    for components in (family.vae_components, family.text_components):
        for component in components:
            folder = Path(family.cfg.path) / component
            assert folder.is_dir(), f"{family.name}: no {component} folder in its model"
            before = model_identity(family, components)
            first = next(p for p in sorted(folder.iterdir()) if p.is_file())
            os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000))
            assert model_identity(family, components) != before, f"{family.name}: {component} is not in the identity"


def test_training_batches_have_a_flops_count(family):
    """The loop logs TFLOP/s (and MFU on a GPU) for every family from trainer.perf's formula."""
    from trainer.config import load_recipe
    from trainer.perf import batch_step_flops

    recipe = load_recipe(None, [f"model.family={family.name}", f"model.path={family.cfg.path}"])
    transformer = family.load_transformer(torch.float32)
    prompts = ["a cat walks on the grass"]
    pictures = [synth.pattern_frames(1, 32, 32)[0]] if family.text_needs_image else None  # HunyuanVideo-I2V's LLaVA
    text = family.encode_prompts(family.load_text_pipeline(), prompts, *([pictures] if pictures else []))
    batch = {"latents": torch.zeros(1, transformer.config.out_channels, 2, 4, 4), **family.collate_text(text)}
    one = batch_step_flops(transformer, family.name, batch, recipe)
    two = batch_step_flops(
        transformer, family.name, {**batch, "latents": batch["latents"].repeat(2, 1, 1, 1, 1)}, recipe
    )
    assert one.model > 0 and two.model == pytest.approx(2 * one.model)
