"""Wan 2.1 text-to-video (1.3B, 14B) in diffusers layout."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch import nn

from trainer.models.base import ModelFamily, pad_stack

WAN_ATTENTION = r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
WAN_FFN = r".*blocks\.\d+\.ffn\.net\.(0\.proj|2)"


class Wan(ModelFamily):
    name = "wan"
    pipeline_class = WanPipeline
    transformer_class = WanTransformer3DModel
    vae_class = AutoencoderKLWan
    default_shift = 3.0  # Wan's own scheduler shift for 480p; musubi-tuner's default too
    native_fps = 16.0
    # Every Linear of the attention blocks (self- and cross-attention, FFN), as musubi-tuner and
    # diffusion-pipe train Wan; FFN keys also keep kohya exports readable by diffusers' converter.
    lora_presets = {"default": f"({WAN_ATTENTION}|{WAN_FFN})", "attention": WAN_ATTENTION}
    text_keys = ("prompt_embeds",)
    text_length = 512  # umT5 tokens the pipeline pads to; the padding is attended (no mask), so keep it
    sample_defaults = {"guidance_scale": 5.0}

    def shape_problem(self, width: int, height: int, frames: int) -> str | None:
        # Wan's RoPE table has rope_max_seq_len positions per axis of the patch grid: a longer axis fails inside
        # the transformer with "shape '[1, 1, N, -1]' is invalid".
        transformer, vae = self.config(self.transformer_class, "transformer"), self.config(self.vae_class, "vae")
        spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
        pt, ph, pw = transformer.get("patch_size", (1, 2, 2))
        grid = ((frames - 1) // temporal + 1) // pt, height // spatial // ph, width // spatial // pw
        limit = transformer.get("rope_max_seq_len", 1024)
        if max(grid) > limit:
            return f"its grid of {'x'.join(map(str, grid))} patches exceeds rope_max_seq_len = {limit} per axis"
        return None

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latents": self.normalise(vae, vae.encode(pixels.to(vae.dtype)).latent_dist.mode())}

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(vae, latents.to(vae.dtype))
        return vae.decode(latents.to(vae.dtype) * std + mean).sample.clamp(-1, 1)

    @staticmethod
    def _mean_std(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like)
        return mean, torch.tensor(vae.config.latents_std).view(shape).to(like)

    @staticmethod
    def normalise(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Per-channel (x - mean) / std, the inverse of what WanPipeline does before decoding."""
        mean, std = Wan._mean_std(vae, latents)
        return (latents - mean) / std

    def encode_prompts(self, text_pipe: WanPipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            embeds, _ = text_pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=self.text_length,
                device=text_pipe.text_encoder.device,
            )
        mask = text_pipe.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).attention_mask
        return [{"prompt_embeds": e[:n].cpu()} for e, n in zip(embeds, mask.sum(1).tolist())]

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": pad_stack([i["prompt_embeds"] for i in items], self.text_length)}

    def predict(self, transformer, noisy, sigmas, batch):
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(noisy.dtype),
            return_dict=False,
        )[0]

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        WanPipeline(**tiny_components(seed)).save_pretrained(out_dir)
        return Path(out_dir)


def tiny_components(seed: int = 0, **transformer_overrides) -> dict:
    """Tokenizer, umT5, VAE, transformer and scheduler of a tiny Wan (the I2V family adds its image encoder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from trainer.models.tiny import t5_like_tokenizer

    tokenizer = t5_like_tokenizer()
    torch.manual_seed(seed)
    umt5 = UMT5Config(
        vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return {
        "tokenizer": tokenizer,
        "transformer": WanTransformer3DModel(**tiny_transformer_config(**transformer_overrides)),
        "vae": AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        "text_encoder": UMT5EncoderModel(umt5),
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    }


def tiny_transformer_config(**overrides) -> dict:
    """diffusers' own test config for Wan (2 blocks, 2 heads x 12, ~30k parameters), with the real model's RoPE
    table (1024 positions per axis, a few kB here) so it takes the shipped recipes' sizes."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024,
        **overrides,
    }
