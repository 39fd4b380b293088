"""HunyuanVideo-I2V (13B image-to-video) in diffusers layout, conditioned as `HunyuanVideoImageToVideoPipeline` does.

Two released variants, told apart by the transformer's `image_condition_type`:
- "token_replace" (hunyuanvideo-community/HunyuanVideo-I2V: 16 input channels, guidance-distilled): latent frame 0 is
  replaced by the clean first-frame latent, which the transformer modulates as timestep 0 and the pipeline never
  updates, so the loss leaves that frame out.
- "latent_concat" (hunyuanvideo-community/HunyuanVideo-I2V-33ch: 33 input channels, no guidance input): the input is
  [noisy 16 | first-frame latent on frame 0, zeros after 16 | mask 1 (1 on frame 0)].
Both take the first frame's own latent, `vae.encode(frame 0 alone).mode() * scaling_factor` (the pipeline's
`prepare_latents`; the causal VAE's first latent frame of the whole clip differs), cached as `image_latents`.

Text: the LLaVA text encoder reads the caption inside the I2V prompt template together with the first frame (its CLIP
tokens stand in for `<image>`); the pipeline keeps every 2nd (latent_concat) or 4th (token_replace) image token in
front of the caption's tokens. So a text entry belongs to a (caption, first frame) pair (`text_needs_image`), made at
prepare time by the pipeline's own `encode_prompt`, and as in the T2V family only the valid tokens are cached.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE
from PIL import Image
from torch import nn

from trainer.config import RecipeError, UserError
from trainer.models.hunyuan_video import HUNYUAN_13B, HunyuanVideo, tiny_transformer_config, tiny_vae
from trainer.perf import Matmul

# The pipeline's default image-token stride per variant (its `image_embed_interleave`).
INTERLEAVE = {"latent_concat": 2, "token_replace": 4}
TOKEN_REPLACE_BLOCKS = ("HunyuanVideoTokenReplaceTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock")


class VaePass(nn.Module):
    """What the VAE pass of `prepare` holds: the VAE inside a pipeline with nothing else, so the first-frame latent
    comes from the pipeline's own `prepare_latents` (never near the text encoder)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae  # registered: .to(device) moves it
        self.pipe = HunyuanVideoImageToVideoPipeline(
            text_encoder=None, tokenizer=None, transformer=None, vae=vae, scheduler=None, text_encoder_2=None,
            tokenizer_2=None, image_processor=None,
        )  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def enable_tiling(self) -> None:
        self.vae.enable_tiling()


class HunyuanVideoI2V(HunyuanVideo):
    name = "hunyuan_video_i2v"
    pipeline_class = HunyuanVideoImageToVideoPipeline
    # The transformer's config picks how many image tokens the text keeps (INTERLEAVE): part of the text's identity.
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_processor", "transformer")
    text_needs_image = True
    # Official sampling: embedded guidance 6.0 with flow shift 7 ("stability") or 17 (more motion); the 33ch model
    # has no guidance input (and its true CFG is off by default).
    sample_defaults = {"guidance_scale": 6.0}
    variants = {3072: "HunyuanVideo-I2V-13B"}
    bench_presets = {
        # text: 576 CLIP tokens of the first frame, every 4th (2nd) kept, in front of up to 256 caption tokens
        "hunyuan-i2v-13b": (
            {**HUNYUAN_13B, "image_condition_type": "token_replace"},
            144 + 256,
            "hunyuanvideo-community/HunyuanVideo-I2V/transformer/config.json",
        ),
        "hunyuan-i2v-33ch-13b": (
            {**HUNYUAN_13B, "in_channels": 33, "guidance_embeds": False, "image_condition_type": "latent_concat"},
            288 + 256,
            "hunyuanvideo-community/HunyuanVideo-I2V-33ch/transformer/config.json",
        ),
    }

    @cached_property
    def condition_type(self) -> str:
        """The model's image_condition_type ("token_replace" or "latent_concat")."""
        kind = self.config(self.transformer_class, "transformer").get("image_condition_type")
        if kind not in INTERLEAVE:
            raise UserError(f"{self.cfg.path}: the transformer's image_condition_type is {kind!r}, not an I2V model")
        return kind

    def load_transformer(self, dtype: torch.dtype, denoiser=None) -> nn.Module:
        transformer = super().load_transformer(dtype, denoiser)
        if self.cfg.guidance is not None and not transformer.config.guidance_embeds:
            raise RecipeError(f"model.guidance: the transformer of {self.cfg.path} has no guidance input (33ch model)")
        # diffusers lists the token-replace blocks under _no_split_modules only: without them train.compile = "blocks"
        # would compile the embedders and none of the blocks.
        transformer._repeated_blocks = [*transformer._repeated_blocks, *TOKEN_REPLACE_BLOCKS]
        return transformer

    @classmethod
    def routed_blocks(cls, transformer):
        if transformer.config.image_condition_type == "token_replace":
            raise RecipeError(
                "train.token_routing: the token-replacement HunyuanVideo-I2V modulates the first frame's tokens by "
                "their count, which routing would break; the 33-channel (latent_concat) model routes"
            )
        return super().routed_blocks(transformer)

    def shape_problem(self, width: int, height: int, frames: int) -> str | None:
        if frames < 5 and self.condition_type == "token_replace":
            return "one latent frame is only the given first frame (token replacement): train on 5+ frames, no stills"
        return None

    # --- caching -------------------------------------------------------------------------------------
    def load_vae(self, dtype: torch.dtype = torch.float32) -> VaePass:
        return VaePass(super().load_vae(dtype))

    def vae_module(self, loaded: nn.Module) -> nn.Module:
        return loaded.vae if isinstance(loaded, VaePass) else loaded

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return super().decode_video(self.vae_module(vae), latents)

    def encode_video(self, vae: VaePass, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().encode_video(vae.vae, pixels)
        pipe, device = vae.pipe, pixels.device
        _, _, frames, height, width = pixels.shape
        image_latents = []
        for video in pixels:
            # The pipeline's input is an image: the clip's first frame, back as the uint8 picture it was decoded as.
            first = Image.fromarray(
                ((video[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            )
            image = pipe.video_processor.preprocess(first, height, width).to(device, vae.dtype)
            placeholder = torch.zeros(1, *out["latents"].shape[1:], device=device)  # so no noise is drawn
            _, latent = pipe.prepare_latents(
                image, 1, out["latents"].shape[1], height, width, frames, torch.float32, device, latents=placeholder
            )
            image_latents.append(latent[:, :, :1])
        return {**out, "image_latents": torch.cat(image_latents)}

    @staticmethod
    def i2v_template(tokenizer, text_encoder_config) -> dict:
        """The official I2V template with its positions counted on this tokenizer and vision tower: `crop_start` (the
        prefix's tokens, `<image>` counted once), where `<image>` is, and how many tokens the image becomes (CLIP's
        patches; the class token is dropped). The pipeline's defaults for llava-llama-3 are 103, 5 and 576."""
        prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
        ids = tokenizer(prefix).input_ids
        start = ids.index(text_encoder_config.image_token_index)
        vision = text_encoder_config.vision_config
        length = (vision.image_size // vision.patch_size) ** 2
        length += text_encoder_config.vision_feature_select_strategy == "full"  # keeps the class token
        return {
            "template": DEFAULT_PROMPT_TEMPLATE["template"],
            "crop_start": len(ids),
            "image_emb_start": start,
            "image_emb_end": start + length,
            "image_emb_len": length,
        }

    def encode_prompts(
        self, text_pipe: HunyuanVideoImageToVideoPipeline, prompts: list[str], images: list[np.ndarray] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        if images is None or len(images) != len(prompts):
            raise ValueError(f"{self.name} encodes each prompt with its first frame: give one image per prompt")
        encoder = text_pipe.text_encoder
        template = self.i2v_template(text_pipe.tokenizer, encoder.config)
        out = []
        for prompt, image in zip(prompts, images):  # one at a time, as the pipeline encodes (its crop assumes it)
            with torch.no_grad():
                embeds, pooled, mask = text_pipe.encode_prompt(
                    image=Image.fromarray(image),
                    prompt=[prompt],
                    prompt_template=template,
                    max_sequence_length=self.text_length,
                    device=encoder.device,
                    dtype=encoder.dtype,
                    image_embed_interleave=INTERLEAVE[self.condition_type],
                )
            n = int(mask.sum())
            if not mask[0, :n].all():
                raise UserError(f"{self.cfg.path}: the Llama tokenizer must pad on the right (padding_side='right')")
            out.append({"prompt_embeds": embeds[0, :n].cpu(), "pooled_projections": pooled[0].cpu()})
        return out

    # --- training ------------------------------------------------------------------------------------
    @classmethod
    def random_conditions(cls, config: dict, latents: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image_latents": torch.randn(*latents.shape[:2], 1, *latents.shape[3:], generator=g)}

    def loss_weight(self, batch):
        if self.condition_type != "token_replace":
            return None
        weight = torch.ones(batch["latents"].shape[2], device=batch["latents"].device)
        weight[0] = 0  # token replacement: frame 0 is given, never denoised
        return weight[None, None, :, None, None]

    def predict(self, transformer, noisy, sigmas, batch):
        dtype = noisy.dtype
        image = batch["image_latents"].to(dtype)
        if transformer.config.image_condition_type == "token_replace":
            hidden = torch.cat([image, noisy[:, :, 1:]], dim=2)
        else:  # latent_concat: [noisy | image latent on frame 0, zeros after | mask 1 on frame 0]
            condition = torch.zeros_like(noisy)
            condition[:, :, :1] = image
            mask = torch.zeros_like(noisy[:, :1])
            mask[:, :, 0] = 1
            hidden = torch.cat([noisy, condition, mask], dim=1)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), self.guidance * 1000.0, device=noisy.device, dtype=dtype)
        return transformer(
            hidden_states=hidden,
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            encoder_attention_mask=batch["encoder_attention_mask"].to(dtype),
            pooled_projections=batch["pooled_projections"].to(dtype),
            guidance=guidance,
            return_dict=False,
        )[0]

    def sample_kwargs(self, image, height, width):
        if image is None:
            raise UserError(f"{self.name} generates from a first frame: pass --image PATH")
        from transformers import AutoConfig, AutoTokenizer

        from data.media import read_image

        # Upright, resized and centre-cropped to the video size as training frames are: the VAE and LLaVA see the
        # picture prepare encoded for a clip's first frame.
        picture = Image.fromarray(read_image(image, (width, height)))
        tokenizer = self.pretrained(AutoTokenizer.from_pretrained, subfolder="tokenizer")
        config = self.pretrained(AutoConfig.from_pretrained, subfolder="text_encoder")
        return {**self.sample_defaults, "image": picture, "prompt_template": self.i2v_template(tokenizer, config)}

    @classmethod
    def step_ops(cls, config: dict, latent: tuple[int, int, int, int], t: int) -> list:
        ops = super().step_ops(config, latent, t)
        if config.get("image_condition_type") != "token_replace":
            return ops
        # Token replacement modulates the first frame's tokens with a timestep-0 embedding: the timestep embedder
        # runs twice, and each block's (video) modulation once more.
        d = config["num_attention_heads"] * config["attention_head_dim"]
        frozen = {"input_grad": False}
        return ops + [
            Matmul("token-replace timestep embedder linear_1", 1, 256, d, **frozen),
            Matmul("token-replace timestep embedder linear_2", 1, d, d, **frozen),
            Matmul("double token-replace modulation", 1, d, 6 * d, config["num_layers"], False, None,
                   "transformer_blocks"),
            Matmul("single token-replace modulation", 1, d, 3 * d, config["num_single_layers"], False, None,
                   "single_transformer_blocks"),
        ]  # fmt: skip

    # --- tiny models ---------------------------------------------------------------------------------
    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0, condition: str = "token_replace") -> Path:
        """The default released variant (token replacement, guidance-distilled); `condition="latent_concat"` makes
        the 33-channel one (here 2 x 4 + 1 channels)."""
        from transformers import (
            CLIPImageProcessor,
            CLIPTextConfig,
            CLIPTextModel,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        from trainer.models.tiny import clip_like_tokenizer, llama_like_tokenizer

        tokenizer = llama_like_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"])
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tokenizer_2 = clip_like_tokenizer()
        torch.manual_seed(seed)
        concat = condition == "latent_concat"
        transformer = HunyuanVideoTransformer3DModel(
            **tiny_transformer_config(in_channels=9 if concat else 4, guidance_embeds=not concat),
            image_condition_type=condition,
        )
        vae = tiny_vae()
        # LLaVA: a CLIP vision tower at 32 px / patch 8 (16 image tokens; 576 real) and a 3-layer Llama (the pipeline
        # reads hidden_states[-3]); the pipeline pads the expanded ids with the config's pad_token_id.
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        vision = CLIPVisionConfig(
            hidden_size=8, intermediate_size=37, projection_dim=32, num_attention_heads=4, num_hidden_layers=2,
            image_size=32, patch_size=8,
        )  # fmt: skip
        llama = LlamaConfig(
            vocab_size=1000, hidden_size=16, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        text_encoder = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=vision,
                text_config=llama,
                image_token_index=image_token,
                image_seq_length=16,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=1000, hidden_size=8, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32, max_position_embeddings=77, bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id,
            )
        )  # fmt: skip
        HunyuanVideoImageToVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=cls.default_shift),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ).save_pretrained(out_dir)
        return Path(out_dir)
