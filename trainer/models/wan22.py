"""Wan 2.2 A14B text-to-video: two 14B experts in diffusers layout (`transformer` = high noise, `transformer_2` = low
noise, switched at model_index.json's `boundary_ratio`: the pipeline runs `transformer` while the timestep is at least
boundary_ratio x 1000). Everything else is Wan 2.1's: VAE, umT5, the transformer call and the LoRA names.

Each expert gets its own LoRA; a step trains the expert of its noise level (trainer/flow_matching.py), so each LoRA
learns only from the noise levels it will denoise at inference.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import WanPipeline, WanTransformer3DModel

from trainer.models.base import Denoiser
from trainer.models.wan import WAN_1_3B, Wan, tiny_components, tiny_transformer_config, wan_reader_notes

WAN_A14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


class TwoExperts:
    """What Wan 2.2 A14B's T2V and I2V share: the expert pair, its boundary and its files (`_high_noise` ...)."""

    expert_components = {"high_noise": "transformer", "low_noise": "transformer_2"}

    @property
    def boundary(self) -> float:
        """The noise level where the experts switch, from the model's own model_index.json."""
        if not hasattr(self, "_boundary"):
            config = self.pretrained(self.pipeline_class.load_config)
            self._boundary = float(config["boundary_ratio"])
        return self._boundary

    def denoisers(self) -> tuple[Denoiser, ...]:
        b = self.boundary
        return Denoiser("transformer", "high_noise", (b, 1.0)), Denoiser("transformer_2", "low_noise", (0.0, b))

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        return wan_reader_notes(fmt, file_modules)


class Wan22(TwoExperts, Wan):
    name = "wan22"
    default_shift = 12.0  # the official T2V A14B sampling shift
    sample_defaults = {"guidance_scale": 4.0, "guidance_scale_2": 3.0}  # (high, low) noise, the official values
    variants = {5120: "Wan2.2-T2V-A14B"}
    bench_presets = {"wan22-a14b": (WAN_A14B, 512, "Wan-AI/Wan2.2-T2V-A14B-Diffusers/transformer/config.json")}

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        components = tiny_components(seed)
        transformer_2 = WanTransformer3DModel(**tiny_transformer_config())  # seeded on from tiny_components'
        WanPipeline(**components, transformer_2=transformer_2, boundary_ratio=0.875).save_pretrained(out_dir)
        return Path(out_dir)
