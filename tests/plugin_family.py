"""A model family defined outside trainer/models/, registered with VIDLORA_FAMILIES only: the seam test's family.

A renamed Wan whose transformer patches 4x4 pixels of latent instead of 2x2 (so buckets step 32 pixels), to show
that everything a family declares reaches prepare, train and export without any other edit.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import WanPipeline

from trainer.models.wan import Wan, tiny_components

NAME = "plugin_wan"
REGISTRATION = f"{NAME}=tests.plugin_family:PluginWan"


class PluginWan(Wan):
    name = NAME
    patch = (1, 4, 4)

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        WanPipeline(**tiny_components(seed, patch_size=(1, 4, 4))).save_pretrained(out_dir)
        return Path(out_dir)
