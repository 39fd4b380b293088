"""Validation during training: a held-out loss at fixed noise levels and fixed noise, and sample videos.

The loss uses the samples of clips held out of training (`validation.holdout_clips`) and/or a separately
prepared cache (`validation.loss_cache_dir`), each at every sigma of `validation.loss_sigmas`, with noise
from (validation seed, sample, sigma): the same number for the same weights in any run on that data, so
curves of different runs compare. Videos come from the family's own diffusers pipeline around the
training transformer, fed the prompt embeddings `vidlora prepare` cached: the text encoder is never
loaded; the VAE is loaded at the first validation, for decoding only, and kept on the CPU in between.

Every rank takes part (ZeRO-3 shards the weights, so every forward needs all ranks): work is split over
ranks and padded so each makes the same number of forward passes.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from data.cache import read_meta
from data.dataset import CachedDataset, collate
from data.media import write_video
from data.prepare import Picture, load_index, validation_size
from trainer.config import Recipe, UserError
from trainer.flow_matching import flow_mse, noisy_and_target
from trainer.models.base import Denoisers, ModelFamily
from trainer.parallel import layout

log = logging.getLogger("vidlora.validation")


class Validator:
    def __init__(
        self, recipe: Recipe, family: ModelFamily, dataset: CachedDataset, accelerator: Accelerator, run: Path
    ):
        self.recipe, self.v, self.family, self.dataset = recipe, recipe.validation, family, dataset
        self.accelerator, self.run_dir = accelerator, run
        # a context-parallel group computes each item together: work is split over groups
        self.group = layout(recipe.train.context_parallel, accelerator.process_index, accelerator.num_processes)
        # (dataset that reads it, index entry): held-out clips first, then a separate cache
        self.loss_items: list[tuple[CachedDataset, dict[str, Any]]] = [(dataset, e) for e in dataset.heldout]
        if self.v.loss_cache_dir:
            other = CachedDataset(self.v.loss_cache_dir)
            if other.family != family.name:
                raise UserError(
                    f"{self.v.loss_cache_dir}: cache was prepared for {other.family!r}, not {family.name!r}"
                )
            self.loss_items += [(other, e) for e in load_index(self.v.loss_cache_dir)["samples"]]
        self.prompts = dataset.validation_text_ids if self.v.videos else []
        if self.v.videos and not self.prompts:
            log.warning("validation: no videos (the cache has no validation prompts: set data.validation_prompts)")
        if not self.loss_items:
            log.warning("validation: no loss (set validation.holdout_clips or validation.loss_cache_dir)")
        self.width, self.height = validation_size(self.v, dataset.entries)
        images = self.v.images
        if images and len(images) not in (1, len(self.prompts)):
            raise UserError(f"validation.images: give one image, or one per validation prompt ({len(self.prompts)})")
        # Checked now, not at the first validation: an I2V run without images fails before it trains.
        # (prompt index, file name suffix, sample_kwargs) of every video: one per prompt, or one per mode.
        self.jobs = [
            (i, suffix, kwargs)
            for i in range(len(self.prompts))
            for suffix, kwargs in family.validation_videos(
                recipe.train, images[i % len(images)] if images else None, self.height, self.width
            )
        ]
        for i, text_id in enumerate(self.prompts):  # prompts encoded with their first frame: that frame, that size
            encoded = (read_meta(dataset.root / "text" / f"{text_id}.safetensors") or {}).get("image")
            wanted = Picture(images[i % len(images)], 0, (self.width, self.height)) if encoded and images else None
            if encoded and (wanted is None or wanted.key() != encoded["key"]):
                size = "x".join(map(str, encoded["size"]))
                raise UserError(
                    f"validation prompt {i + 1} was encoded by `vidlora prepare` with {encoded['source']} at {size}, "
                    f"not with {wanted.source if wanted else 'no image'} at {self.width}x{self.height} (a changed "
                    "validation.images, image file, width/height or holdout_clips): re-run `vidlora prepare`"
                )
        self.vae: torch.nn.Module | None = None
        self.others: dict[str, torch.nn.Module] = {}  # experts this run does not train, for the pipeline

    def shard(self, n: int) -> list[int | None]:
        """This rank's item indices, padded with None so every rank makes the same number of passes (the ranks
        of a context-parallel group get the same ones: each group's loss counts once per rank, its share unchanged)."""
        rank, world = self.group.dp_rank, self.group.dp
        return [i if i < n else None for i in range(rank, math.ceil(n / world) * world, world)]

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int, subfolder: str = "") -> dict[str, float]:
        """Validation logs; videos go to validation/[subfolder/]step-N."""
        model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        logs: dict[str, float] = {}
        try:
            if self.loss_items:
                logs.update(self.loss(model))
            if self.prompts:
                self.videos(model, step, subfolder)
        finally:
            model.train(was_training)
        return logs

    def loss(self, model: Denoisers) -> dict[str, float]:
        """val_loss over every fixed sigma a trained denoiser serves, per sigma (val_loss_sigma_0.1 ...: which noise
        levels the LoRA helps or hurts) and per expert (val_loss_high_noise ...)."""
        device = self.accelerator.device
        trained = self.family.trained_denoisers()
        sigmas = [
            (k, s, d) for k, s in enumerate(self.v.loss_sigmas) for d in trained if d.sigmas[0] <= s < d.sigmas[1]
        ]
        total = torch.zeros(len(trained), 2, dtype=torch.float64, device=device)
        per_sigma = torch.zeros(len(self.v.loss_sigmas), 2, dtype=torch.float64, device=device)
        for i in self.shard(len(self.loss_items)):
            reader, entry = self.loss_items[i if i is not None else 0]
            batch = collate([reader.load(entry, entry["text_ids"][0])])
            batch.update(self.family.collate_text(batch.pop("text")))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for k, sigma, denoiser in sigmas:
                g = torch.Generator().manual_seed((self.v.seed * 1_000_003 + (i or 0)) * 101 + k)
                noisy, target = noisy_and_target(batch["latents"], torch.tensor([sigma]), g)
                drawn = {**batch, **self.family.draw_conditions(self.recipe.train, [g])}
                pred = model(denoiser.component, noisy, torch.tensor([sigma], device=device), drawn)
                if i is not None:
                    loss = flow_mse(pred, target, self.family.loss_weight(drawn)).double()
                    total[trained.index(denoiser)] += torch.stack([loss, torch.ones_like(loss)])
                    per_sigma[k] += torch.stack([loss, torch.ones_like(loss)])
        total, per_sigma = self.accelerator.reduce(torch.cat([total, per_sigma]), "sum").split(
            [len(trained), len(per_sigma)]
        )
        logs = {"val_loss": (total[:, 0].sum() / total[:, 1].sum()).item()} if total[:, 1].sum() else {}
        if len(self.v.loss_sigmas) > 1:
            logs |= {
                f"val_loss_sigma_{s:g}": (t[0] / t[1]).item() for s, t in zip(self.v.loss_sigmas, per_sigma) if t[1]
            }
        if len(trained) > 1:
            logs |= {f"val_loss_{d.label}": (t[0] / t[1]).item() for d, t in zip(trained, total) if t[1]}
        return logs

    def pipeline(self, model: Denoisers) -> Any:
        dtype = torch.float32 if self.accelerator.device.type == "cpu" else torch.bfloat16
        if self.vae is None:
            self.vae = self.family.load_vae(dtype)
        for d in self.family.denoisers():  # a one-expert run still samples with both: the other one as it is
            if d.component not in model.experts and d.component not in self.others:
                self.others[d.component] = self.family.load_transformer(dtype, d).eval()
        self.vae.to(self.accelerator.device)
        pipe = self.family.pretrained(
            self.family.pipeline_class.from_pretrained,
            **dict(model.experts.items()),
            **self.others,
            vae=self.family.vae_module(self.vae),
            text_encoder=None,
            tokenizer=None,
        )
        for name, component in pipe.components.items():  # e.g. the I2V image encoder, loaded on the CPU
            if isinstance(component, torch.nn.Module) and name not in (*model.experts, "vae"):
                component.to(self.accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def videos(self, model: torch.nn.Module, step: int, subfolder: str = "") -> list[Path]:
        acc, v = self.accelerator, self.v
        pipe = self.pipeline(model)
        negative = self.dataset.validation_negative_id
        negative_text = self.dataset.text(negative) if negative else None
        guidance = v.guidance_scale or self.family.sample_defaults.get("guidance_scale", 1.0)
        if negative_text is None and guidance > 1.0 and self.family.guidance_is_cfg:
            log.warning("validation: the cache has no negative prompt (re-run prepare); sampling without guidance")
            guidance = 1.0
        out_dir = self.run_dir / "validation" / subfolder / f"step-{step:06d}"
        written = []
        for j in self.shard(len(self.jobs)):
            i, suffix, extra = self.jobs[j if j is not None else 0]
            text_id = self.prompts[i]
            kwargs = self.family.validation_kwargs(self.dataset.text(text_id), negative_text)
            frames = self.family.run_pipeline(
                pipe,
                **kwargs,
                **{**extra, "guidance_scale": guidance},
                height=self.height,
                width=self.width,
                num_frames=v.num_frames,
                num_inference_steps=v.inference_steps,
                generator=torch.Generator(acc.device).manual_seed(v.seed + i),
                output_type="np",
            ).frames[0]
            if j is None or not self.group.lead:
                continue
            pixels = (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)
            name = f"{i:02d}-{slug(self.dataset.caption(text_id))}{f'-{suffix}' if suffix else ''}.mp4"
            written.append(write_video(out_dir / name, pixels, fps=self.family.native_fps))
        self.vae.to("cpu")
        for other in self.others.values():
            other.to("cpu")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.log_videos(step, sorted(out_dir.glob("*.mp4")))
        return written

    def log_videos(self, step: int, paths: list[Path]) -> None:
        if not self.recipe.logging.wandb:
            return
        import wandb

        tracker = self.accelerator.get_tracker("wandb", unwrap=True)

        captions = {i: self.dataset.caption(t) for i, t in enumerate(self.prompts)}
        tracker.log(
            {
                f"validation/{p.stem}": wandb.Video(str(p), caption=captions[int(p.stem[:2])], format="mp4")
                for p in paths
            },
            step=step,
        )


def slug(text: str) -> str:
    return re.sub(r"[^\w]+", "_", text.lower()).strip("_")[:40] or "prompt"
