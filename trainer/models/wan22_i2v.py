"""Wan 2.2 A14B image-to-video: Wan 2.1 I2V's first-frame conditioning (the latent of [image, zeros...] and its mask
on channels) without the CLIP image tokens, on the two experts of Wan 2.2 (trainer/models/wan22.py), boundary 0.9."""

from __future__ import annotations

from pathlib import Path

from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

from trainer.models.wan import WAN_ATTENTION, WAN_FFN, tiny_components, tiny_transformer_config
from trainer.models.wan22 import WAN_A14B, TwoExperts
from trainer.models.wan_i2v import WanI2V


class Wan22I2V(TwoExperts, WanI2V):
    name = "wan22_i2v"
    default_shift = 5.0  # the official I2V A14B sampling shift
    sample_defaults = {"guidance_scale": 3.5, "guidance_scale_2": 3.5}
    lora_presets = {"default": f"({WAN_ATTENTION}|{WAN_FFN})", "attention": WAN_ATTENTION}
    vae_components = ("vae",)  # no image encoder: the condition is the first frame's latent only
    variants = {5120: "Wan2.2-I2V-A14B"}
    bench_presets = {
        "wan22-i2v-a14b": ({**WAN_A14B, "in_channels": 36}, 512, "Wan-AI/Wan2.2-I2V-A14B-Diffusers/transformer")
    }

    @classmethod
    def claims_lora(cls, modules: set[str]) -> bool:
        return False  # its LoRA names are Wan's, without the image cross-attention that marks Wan 2.1 I2V

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        components = tiny_components(seed, in_channels=36)
        transformer_2 = WanTransformer3DModel(**tiny_transformer_config(in_channels=36))
        WanImageToVideoPipeline(
            **components, transformer_2=transformer_2, boundary_ratio=0.9, image_encoder=None, image_processor=None
        ).save_pretrained(out_dir)
        return Path(out_dir)
