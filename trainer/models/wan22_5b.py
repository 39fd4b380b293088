"""Wan 2.2 TI2V-5B: one 5B transformer for text-to-video and image-to-video, on the Wan 2.2 VAE (48 latent channels,
16x16 spatial and 4x temporal compression, so buckets step 32 pixels with the 2x2 patch).

At inference (diffusers, `expand_timesteps=True`) the timestep is per token. `WanPipeline` gives every token the
step's timestep; `WanImageToVideoPipeline` on the same folder puts the normalised latent of the image in latent frame
0, gives that frame's tokens timestep 0 and never uses the prediction there. Training does the same per sample
(`train.ti2v`): an image-conditioned sample's latent frame 0 is its own clean latent, its tokens get timestep 0, and
the loss leaves that frame out.

The Wan VAE is causal in time (latent frame 0 encodes pixel frame 0 alone), so a clip's cached latent frame 0 is what
the pipeline encodes from the clip's first frame given as an image: one cache serves both modes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from trainer.config import UserError
from trainer.models.base import log
from trainer.models.wan import WAN_1_3B, Wan, tiny_components, wan_reader_notes
from trainer.perf import grid_tokens

WAN_5B = {**WAN_1_3B, "num_attention_heads": 24, "ffn_dim": 14336, "in_channels": 48, "out_channels": 48}
FIRST_FRAME = "first_frame"  # batch key: [B] bool, the sample is conditioned on its first frame


class Wan22TI2V(Wan):
    name = "wan22_5b"
    default_shift = 5.0  # the official sampling shift
    native_fps = 24.0  # 121 frames = 5 s at 24 fps, as the model generates
    sample_defaults = {"guidance_scale": 5.0}
    vae_stride = (4, 16, 16)
    latent_channels = 48
    per_token_timesteps = True
    variants = {3072: "Wan2.2-TI2V-5B"}
    bench_presets = {"wan22-ti2v-5b": (WAN_5B, 512, "Wan-AI/Wan2.2-TI2V-5B-Diffusers/transformer/config.json")}

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        return wan_reader_notes(fmt, file_modules)

    @classmethod
    def step_ops(cls, config: dict, latent: tuple[int, int, int, int], t: int) -> list:
        """Wan's products, with the time embedding computed per token (expand_timesteps) instead of once."""
        n = grid_tokens(cls.patch_of(config), latent)
        ops = super().step_ops(config, latent, t)
        return [replace(op, tokens=n) if op.name.startswith("time_") else op for op in ops]

    # --- the two modes ---------------------------------------------------------------------------------
    def check_train(self, train) -> None:
        pass  # every train.ti2v mode is this model's

    def draw_conditions(self, train, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        if train.ti2v == "t2v":
            return {}
        if train.ti2v == "i2v":
            return {FIRST_FRAME: torch.ones(len(generators), dtype=torch.bool)}
        return {FIRST_FRAME: torch.cat([torch.rand(1, generator=g) < train.ti2v_i2v_share for g in generators])}

    @staticmethod
    def frame_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, f]: 1 for latent frames the transformer denoises, 0 for a given first frame (as the pipeline's
        `first_frame_mask`). A one-frame sample (a still) has nothing to condition on, so it stays text-to-video."""
        latents = batch["latents"]
        mask = torch.ones(latents.shape[0], latents.shape[2], device=latents.device)
        given = batch.get(FIRST_FRAME)
        if given is not None and latents.shape[2] > 1:
            mask[given.to(latents.device), 0] = 0
        return mask

    def predict(self, transformer, noisy, sigmas, batch):
        mask = self.frame_mask(batch)
        clean = batch["latents"].to(noisy.dtype)
        _, ph, pw = transformer.config.patch_size
        tokens_per_frame = (noisy.shape[3] // ph) * (noisy.shape[4] // pw)
        timestep = (sigmas.to(mask.device) * 1000)[:, None] * mask  # per latent frame, 0 on a given one
        return transformer(
            hidden_states=torch.where(mask[:, None, :, None, None].bool(), noisy, clean),
            timestep=timestep.repeat_interleave(tokens_per_frame, dim=1),  # per token, frame by frame
            encoder_hidden_states=batch["prompt_embeds"].to(noisy.dtype),
            return_dict=False,
        )[0]

    def loss_weight(self, batch):
        return self.frame_mask(batch)[:, None, :, None, None] if FIRST_FRAME in batch else None

    # --- sampling --------------------------------------------------------------------------------------
    def sample_kwargs(self, image, height, width):
        if image is None:
            return dict(self.sample_defaults)
        from data.media import read_image

        return {**self.sample_defaults, "image": Image.fromarray(read_image(image, (width, height)))}

    def validation_videos(self, train, image, height, width):
        videos = [] if train.ti2v == "i2v" else [("t2v", self.sample_kwargs(None, height, width))]
        if image is not None:
            videos.append(("i2v", self.sample_kwargs(image, height, width)))
        elif train.ti2v == "i2v":
            raise UserError("validation.images: train.ti2v = 'i2v' trains image-to-video only; give first frames")
        elif train.ti2v == "mixed":
            log.warning("validation: no validation.images, so text-to-video videos only")
        return videos

    def run_pipeline(self, pipe, **kwargs):
        if kwargs.get("image") is None:
            return pipe(**kwargs)
        # The image-to-video pipeline on the same components (diffusers' own for this model), built per call.
        i2v = WanImageToVideoPipeline(
            **pipe.components, image_encoder=None, image_processor=None, expand_timesteps=True
        )
        i2v.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return i2v(**kwargs)

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        components = tiny_components(seed, in_channels=48, out_channels=48)
        # The Wan 2.2 VAE's layout (diffusers' own test config): residual blocks, 2x2 patchify into 12 channels,
        # 16x spatial; non-trivial per-channel statistics so the normalisation shows.
        g = torch.Generator().manual_seed(seed)
        components["vae"] = AutoencoderKLWan(
            base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            scale_factor_spatial=16, scale_factor_temporal=4,
            latents_mean=(torch.randn(48, generator=g) * 0.3).round(decimals=4).tolist(),
            latents_std=(torch.rand(48, generator=g) + 0.5).round(decimals=4).tolist(),
        )  # fmt: skip
        WanPipeline(**components, expand_timesteps=True).save_pretrained(out_dir)
        return Path(out_dir)
