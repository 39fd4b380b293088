"""HunyuanVideo (13B) text-to-video in diffusers layout.

Text: the pipeline's own `encode_prompt` (Llama hidden_states[-3] of the prompt inside the official template,
cropped after the template's prefix; CLIP-L `pooler_output`). The transformer builds its joint attention mask from
the number of valid text tokens only (the first N), so the cache keeps just the valid tokens and each batch is
padded on the right to its longest caption: less to store, less attention to compute, identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from torch import nn

from trainer.config import UserError
from trainer.models.base import ModelFamily, pad_stack

# peft full-matches these against module names. Anchored at the block lists on purpose: a bare `to_q` would also
# wrap the token refiner (context_embedder.token_refiner...), whose fused original layout cannot be exported.
HV_ATTENTION = (
    r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))"
)
HV_MLP = (
    r"(transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))"
)
HV_DOUBLE = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|(ff|ff_context)\.net\.(0\.proj|2))"
HV_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"


class HunyuanVideo(ModelFamily):
    name = "hunyuan_video"
    pipeline_class = HunyuanVideoPipeline
    transformer_class = HunyuanVideoTransformer3DModel
    vae_class = AutoencoderKLHunyuanVideo
    default_shift = 7.0  # the official sampler's flow_shift; musubi-tuner trains HunyuanVideo video at 7 too
    native_fps = 24.0
    # Every Linear of the double- and single-stream blocks except the modulation (norm*.linear), as musubi-tuner
    # and diffusion-pipe train it; single blocks have no separate output projection: proj_out takes attention+MLP.
    lora_presets = {
        "default": f"({HV_ATTENTION}|{HV_MLP})",
        "attention": HV_ATTENTION,
        "double_blocks": HV_DOUBLE,
        "single_blocks": HV_SINGLE,
    }
    text_keys = ("prompt_embeds", "pooled_projections")
    text_length = 256  # Llama tokens after the template, as the pipeline encodes them
    # The distilled model is trained with guidance 1.0 (musubi-tuner, finetrainers) and sampled at 6.0 (official).
    default_guidance = 1.0
    sample_defaults = {"guidance_scale": 6.0}
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    guidance_is_cfg = False  # guidance_scale is the distilled model's embedded guidance, not CFG

    @staticmethod
    def prompt_template(tokenizer) -> dict:
        """The official template with `crop_start` counted on this tokenizer (95 for llava-llama-3). Always passed
        explicitly: the pipeline's automatic count is wrong for tokenizers with a model_max_length."""
        prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
        return {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": len(tokenizer(prefix).input_ids)}

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        # HunyuanVideo latents are only scaled (no shift); the pipeline divides by the same factor before decoding.
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        return {"latents": latents * vae.config.scaling_factor}

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)

    def encode_prompts(self, text_pipe: HunyuanVideoPipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        encoder = text_pipe.text_encoder
        with torch.no_grad():
            embeds, pooled, mask = text_pipe.encode_prompt(
                prompt=prompts,
                prompt_template=self.prompt_template(text_pipe.tokenizer),
                max_sequence_length=self.text_length,
                device=encoder.device,
                dtype=encoder.dtype,
            )
        lengths = mask.sum(1)
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]):
            raise UserError(f"{self.cfg.path}: the Llama tokenizer must pad on the right (padding_side='right')")
        return [
            {"prompt_embeds": e[:n].cpu(), "pooled_projections": p.cpu()}
            for e, p, n in zip(embeds, pooled, lengths.tolist())
        ]

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        embeds = pad_stack([i["prompt_embeds"] for i in items])
        lengths = torch.tensor([i["prompt_embeds"].shape[0] for i in items])
        return {
            "prompt_embeds": embeds,
            "encoder_attention_mask": (torch.arange(embeds.shape[1])[None] < lengths[:, None]).long(),
            "pooled_projections": torch.stack([i["pooled_projections"] for i in items]),
        }

    def predict(self, transformer, noisy, sigmas, batch):
        dtype = noisy.dtype
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            encoder_attention_mask=batch["encoder_attention_mask"].to(dtype),
            pooled_projections=batch["pooled_projections"].to(dtype),
            guidance=torch.full((noisy.shape[0],), self.guidance * 1000.0, device=noisy.device, dtype=dtype),
            return_dict=False,
        )[0]

    def validation_kwargs(self, text, negative):
        # The pipeline names the cached tensors differently from the transformer call.
        names = {"encoder_attention_mask": "prompt_attention_mask", "pooled_projections": "pooled_prompt_embeds"}
        kwargs = {}
        for prefix, item in (("", text), ("negative_", negative)):
            if item is not None:
                kwargs.update({prefix + names.get(k, k): v for k, v in self.collate_text([item]).items()})
        return kwargs

    def sample_kwargs(self, image, height, width):
        from transformers import AutoTokenizer

        tokenizer = self.pretrained(AutoTokenizer.from_pretrained, subfolder="tokenizer")
        return {**super().sample_kwargs(image, height, width), "prompt_template": self.prompt_template(tokenizer)}

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from trainer.models.tiny import clip_like_tokenizer, llama_like_tokenizer

        tokenizer = llama_like_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"])
        tokenizer_2 = clip_like_tokenizer()
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(**tiny_transformer_config())
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
        text_encoder = LlamaModel(  # 3 layers at least: the pipeline reads hidden_states[-3]
            LlamaConfig(
                vocab_size=1000,
                hidden_size=16,
                intermediate_size=37,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = CLIPTextModel(  # eos_token_id must be the tokenizer's (2 selects CLIP's legacy pooling)
            CLIPTextConfig(
                vocab_size=1000,
                hidden_size=8,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=32,
                max_position_embeddings=77,
                bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                pad_token_id=tokenizer_2.pad_token_id,
            )
        )
        pipe = HunyuanVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=cls.default_shift),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        pipe.save_pretrained(out_dir)
        return Path(out_dir)


def tiny_transformer_config(**overrides) -> dict:
    """diffusers' own test config for HunyuanVideo: hidden 20 (2 heads x 10), 1 double, 1 single, 1 refiner block."""
    return {
        "in_channels": 4,
        "out_channels": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 10,
        "num_layers": 1,
        "num_single_layers": 1,
        "num_refiner_layers": 1,
        "patch_size": 1,
        "patch_size_t": 1,
        "guidance_embeds": True,
        "text_embed_dim": 16,
        "pooled_projection_dim": 8,
        "rope_axes_dim": (2, 4, 4),
        **overrides,
    }
