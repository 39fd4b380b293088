"""HunyuanVideo 1.5 (8.3B) image-to-video in diffusers layout: the text-to-video family plus the first frame.

The condition is built at prepare time by `HunyuanVideo15ImageToVideoPipeline`'s own methods from each training
window's first frame, exactly as the pipeline builds it from its `image` argument:
- `image_embeds`: `pipe.encode_image` = SigLIP's `last_hidden_state` (729 x 1152 for the real encoder at 384 px),
  which the transformer attends to as 729 more context tokens;
- `condition_latents`: `pipe._get_image_latents` = the VAE `mode()` of the image alone (a one-frame video) times the
  scaling factor, [32, 1, h, w]. The transformer input is [noisy 32 | condition 32 | mask 1]: the condition holds
  this latent on latent frame 0 and zeros after it, the mask is 1 on frame 0; both depend only on it and the shape,
  so `predict` rebuilds them.
The pipeline chooses the video size itself: the bucket of the image's aspect ratio at the transformer's
`target_size` (640 for 480p, 960 for 720p), so samples come at that size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline
from PIL import Image
from torch import nn

from data.media import read_image
from trainer.config import UserError
from trainer.models.hunyuan_video15 import HunyuanVideo15, tiny_components
from trainer.models.wan_i2v import VaePass

log = logging.getLogger("vidlora.models")


class HunyuanVideo15I2V(HunyuanVideo15):
    name = "hunyuan_video15_i2v"
    pipeline_class = HunyuanVideo15ImageToVideoPipeline
    default_shift = 5.0  # the official 480p I2V shift (720p: 7.0)
    vae_components = ("vae", "image_encoder", "feature_extractor")  # the condition is part of the latent entry
    # SigLIP in fp32 wherever it runs, so samples see the image embeddings the cache was made with.
    fp32_components = ("image_encoder",)
    variants = {2048: "HunyuanVideo-1.5-I2V-8.3B"}
    image_tokens = 729  # SigLIP so400m at 384 px
    bench_presets = {}  # the transformer of the text-to-video presets (plus 729 image tokens)

    @classmethod
    def claims_lora(cls, modules: set[str]) -> bool:
        """The T2V model has the same modules (its image embedder too): a file without vidlora's header reads as T2V."""
        return False

    def load_vae(self, dtype: torch.dtype = torch.float32) -> VaePass:
        """A partial pipeline with the VAE and SigLIP only, so the condition comes from the pipeline's own methods."""
        pipe = self.pretrained(
            self.pipeline_class.from_pretrained,
            **dict.fromkeys(("transformer", *self.text_components, "scheduler", "guider")),
            dtype={"vae": dtype, **dict.fromkeys(self.fp32_components, torch.float32)},
        )
        return VaePass(pipe)

    def vae_module(self, loaded: nn.Module) -> nn.Module:
        return loaded.vae if isinstance(loaded, VaePass) else loaded

    def load_text_pipeline(
        self, dtype: torch.dtype = torch.float32, **without: None
    ) -> HunyuanVideo15ImageToVideoPipeline:
        return super().load_text_pipeline(dtype, image_encoder=None, feature_extractor=None, **without)

    def encode_video(self, vae: VaePass, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().encode_video(vae, pixels)
        pipe, device = vae.pipe, pixels.device
        height, width = pixels.shape[-2:]
        conditions, embeds = [], []
        for video in pixels:
            # The pipeline's input is an image: the window's first frame, back as the uint8 picture it was decoded as.
            first = Image.fromarray(
                ((video[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            )
            embeds.append(pipe.encode_image(first, batch_size=1, device=device, dtype=torch.float32))
            conditions.append(pipe._get_image_latents(pipe.vae, pipe.video_processor, first, height, width, device))
        return {**out, "condition_latents": torch.cat(conditions), "image_embeds": torch.cat(embeds)}

    def conditions(self, batch: dict[str, torch.Tensor], noisy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The pipeline's `prepare_cond_latents_and_mask`: the image latent on latent frame 0, zeros after it, and a
        mask that is 1 on frame 0."""
        condition, mask = torch.zeros_like(noisy), torch.zeros_like(noisy[:, :1])
        condition[:, :, :1] = batch["condition_latents"].to(noisy.dtype)
        mask[:, :, 0] = 1
        return condition, mask

    def image_embeds(self, transformer: nn.Module, batch: dict[str, torch.Tensor], noisy: torch.Tensor) -> torch.Tensor:
        return batch["image_embeds"].to(noisy.dtype)

    def sample_kwargs(self, image: str | Path | None, height: int, width: int) -> dict[str, Any]:
        if image is None:
            raise UserError(f"{self.name} generates from a first frame: pass --image PATH")
        return {**self.sample_defaults, "image": Image.fromarray(read_image(image, (width, height)))}

    def run_pipeline(self, pipe: HunyuanVideo15ImageToVideoPipeline, **kwargs: Any) -> Any:
        """The pipeline takes no size: it generates at the bucket of the image's aspect ratio at its target size."""
        height, width = kwargs.pop("height", None), kwargs.pop("width", None)
        image = kwargs["image"]
        size = tuple(pipe.video_processor.calculate_default_height_width(image.height, image.width, pipe.target_size))
        if height is not None and size != (height, width):
            log.warning(
                "%dx%d is not a size of the model's buckets (target_size %d): the pipeline generates %dx%d",
                width, height, pipe.target_size, size[1], size[0],
            )  # fmt: skip
        return super().run_pipeline(pipe, **kwargs)

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        components = tiny_components(seed, task_type="i2v")
        # SigLIP so400m at 384 px gives 729 tokens x 1152 (real); 32 px / patch 8 gives 16 x 12 here.
        siglip = SiglipVisionConfig(
            hidden_size=components["transformer"].config.image_embed_dim, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8,
        )  # fmt: skip
        cls.pipeline_class(
            **components,
            image_encoder=SiglipVisionModel(siglip),
            feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        ).save_pretrained(out_dir)
        return Path(out_dir)
