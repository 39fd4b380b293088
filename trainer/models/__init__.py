"""Registry of model families: adding one is a file in this folder plus a line here."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import ModelSection
    from trainer.models.base import ModelFamily

# name -> "module:Class", imported lazily so `vidlora --help` does not import diffusers. The name is what recipes
# (model.family), caches and adapter headers say.
FAMILIES: dict[str, str] = {
    "wan": "trainer.models.wan:Wan",
    "wan_i2v": "trainer.models.wan_i2v:WanI2V",
    "wan22": "trainer.models.wan22:Wan22",
    "wan22_i2v": "trainer.models.wan22_i2v:Wan22I2V",
    "wan22_5b": "trainer.models.wan22_5b:Wan22TI2V",
    "hunyuan_video": "trainer.models.hunyuan_video:HunyuanVideo",
    "hunyuan_video_i2v": "trainer.models.hunyuan_video_i2v:HunyuanVideoI2V",
    "hunyuan_video15": "trainer.models.hunyuan_video15:HunyuanVideo15",
    "hunyuan_video15_i2v": "trainer.models.hunyuan_video15_i2v:HunyuanVideo15I2V",
}
DEFAULT_FAMILY = "wan"  # a recipe without model.family
# Families from outside this folder (plugins, tests): VIDLORA_FAMILIES="name=package.module:Class,...".
for _item in filter(None, os.environ.get("VIDLORA_FAMILIES", "").split(",")):
    _name, _, _target = _item.partition("=")
    FAMILIES[_name.strip()] = _target.strip()


def family_class(name: str) -> type[ModelFamily]:
    import importlib

    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_family(cfg: ModelSection) -> ModelFamily:
    return family_class(cfg.family)(cfg)
