"""Wan 2.1 image-to-video (14B, 480p/720p) in diffusers layout: Wan T2V plus first-frame conditioning.

The condition is built at prepare time by `WanImageToVideoPipeline`'s own methods from each clip's first frame,
exactly as the pipeline builds it from the input image at inference: the CLIP image embedding (penultimate layer)
and the normalised latent of [first frame, zeros...] (VAE mode). The transformer input is
[noisy latents 16 | mask 4 | condition latent 16] on channels; the mask depends only on the shape, so the cache
keeps the 16 latent channels and `predict` rebuilds the mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from torch import nn

from trainer.config import UserError
from trainer.models.base import first_frame
from trainer.models.wan import WAN_ATTENTION, WAN_FFN, Wan, tiny_components, wan_reader_notes

WAN_IMAGE_KV = r".*blocks\.\d+\.attn2\.(add_k_proj|add_v_proj)"  # cross-attention keys/values of the image tokens
MASK_CHANNELS = 4  # the first-frame mask, one channel per frame folded into a latent frame (temporal compression)


class VaePass(nn.Module):
    """What the VAE pass of `prepare` holds for I2V: a partial pipeline with the VAE and the CLIP image encoder
    (never the text encoder), so the condition comes from the pipeline's own `encode_image`/`prepare_latents`."""

    def __init__(self, pipe: WanImageToVideoPipeline):
        super().__init__()
        self.vae, self.image_encoder = pipe.vae, pipe.image_encoder  # registered: .to(device) moves them
        self.pipe = pipe

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def enable_tiling(self) -> None:
        self.vae.enable_tiling()


class WanI2V(Wan):
    name = "wan_i2v"
    pipeline_class = WanImageToVideoPipeline
    lora_presets = {
        "default": f"({WAN_ATTENTION}|{WAN_IMAGE_KV}|{WAN_FFN})",
        "attention": f"({WAN_ATTENTION}|{WAN_IMAGE_KV})",
        "t2v": f"({WAN_ATTENTION}|{WAN_FFN})",  # the modules a Wan T2V LoRA has
    }
    text_keys = ("prompt_embeds",)
    vae_components = ("vae", "image_encoder", "image_processor")  # the condition is part of the latent entry
    variants = {5120: "Wan2.1-I2V-14B"}
    # CLIP in fp32 wherever it runs, as diffusers' Wan I2V examples load it: samples then see the image embeddings
    # the cache was made with. It is small next to the VAE activations.
    fp32_components = ("image_encoder",)
    # text_length stays 512: the I2V attention splits image from text tokens with a hard-coded 512, so any other
    # length is silently wrong.

    @classmethod
    def claims_lora(cls, modules: set[str]) -> bool:
        return any(".attn2.add_" in m for m in modules)  # the image cross-attention only I2V has

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        return wan_reader_notes(fmt, file_modules)

    def load_vae(self, dtype: torch.dtype = torch.float32) -> VaePass:
        pipe = self.pretrained(
            self.pipeline_class.from_pretrained,
            transformer=None,
            text_encoder=None,
            tokenizer=None,
            scheduler=None,
            dtype={"vae": dtype, **dict.fromkeys(self.fp32_components, torch.float32)},
        )
        return VaePass(pipe)

    def vae_module(self, loaded: nn.Module) -> nn.Module:
        return loaded.vae if isinstance(loaded, VaePass) else loaded

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return super().decode_video(self.vae_module(vae), latents)

    def load_text_pipeline(self, dtype: torch.dtype = torch.float32) -> WanImageToVideoPipeline:
        return self.pretrained(
            self.pipeline_class.from_pretrained,
            transformer=None,
            vae=None,
            image_encoder=None,
            image_processor=None,
            dtype=dtype,
        )

    def encode_video(self, vae: VaePass, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().encode_video(vae.vae, pixels)
        pipe, device = vae.pipe, pixels.device
        _, _, frames, height, width = pixels.shape
        z = vae.vae.config.z_dim
        embeds, conditions = [], []
        for video in pixels:
            # The pipeline's input is an image: the clip's first frame, back as the uint8 picture it was decoded as.
            first = Image.fromarray(
                ((video[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            )
            if pipe.image_encoder is not None:  # Wan 2.1 I2V's CLIP tokens (Wan 2.2 I2V has none)
                embeds.append(pipe.encode_image(first, device))
            image = pipe.video_processor.preprocess(first, height=height, width=width).to(device, torch.float32)
            placeholder = torch.zeros(1, z, *out["latents"].shape[2:], device=device)  # so no noise is drawn
            _, condition = pipe.prepare_latents(
                image, 1, z, height, width, frames, torch.float32, device, latents=placeholder
            )
            conditions.append(condition[:, MASK_CHANNELS:])
        out["condition_latents"] = torch.cat(conditions)
        return {**out, "image_embeds": torch.cat(embeds)} if embeds else out

    def predict(self, transformer, noisy, sigmas, batch):
        condition = batch["condition_latents"].to(noisy.dtype)
        mask = torch.zeros_like(condition[:, :MASK_CHANNELS])
        mask[:, :, 0] = 1  # the given (first) frame
        return transformer(
            hidden_states=torch.cat([noisy, mask, condition], dim=1),
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(noisy.dtype),
            encoder_hidden_states_image=batch["image_embeds"].to(noisy.dtype) if "image_embeds" in batch else None,
            return_dict=False,
        )[0]

    def sample_kwargs(self, image, height, width):
        if image is None:
            raise UserError(f"{self.name} generates from a first frame: pass --image PATH")
        # Resized and centre-cropped to the video size as training frames are, so CLIP sees the same crop.
        return {**self.sample_defaults, "image": first_frame(image, width, height)}

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        # image_dim = the CLIP hidden size (1280 real); added_kv_proj_dim = the inner dim (5120 for 14B).
        components = tiny_components(seed, in_channels=36, image_dim=16, added_kv_proj_dim=2 * 12)
        # CLIP ViT-H/14 at 224 px gives 257 tokens x 1280 (real); 32 px / patch 4 gives 65 x 16 here.
        clip = CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
            patch_size=4, projection_dim=16,
        )  # fmt: skip
        WanImageToVideoPipeline(
            **components,
            image_encoder=CLIPVisionModel(clip),
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ).save_pretrained(out_dir)
        return Path(out_dir)
