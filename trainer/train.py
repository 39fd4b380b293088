"""`vidlora train`: LoRA training on cached latents under accelerate (one process, DDP or DeepSpeed).

Setup first, then one explicit loop. The loop never branches on the model family: the family's adapter
turns a batch into a transformer call, and trainer/flow_matching.py supplies noise, timesteps and targets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.dataset import BucketBatchSampler, CachedDataset, collate
from trainer.checkpoint import ADAPTER, latest_checkpoint, load_trainer_state, save_adapter, save_checkpoint
from trainer.config import Recipe, UserError, resolve_device_precision
from trainer.flow_matching import noisy_and_target, sample_sigmas, step_generator
from trainer.models import get_family
from trainer.models.base import DTYPES, ModelFamily
from trainer.perf import apply_speed_options

log = logging.getLogger("vidlora.train")


@dataclass
class Position:
    """Where training is; saved in every checkpoint so a resume continues at the same batch."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches consumed in this epoch (this process)
    micro: int = 0  # micro-batches consumed in total

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.__init__(**state)


def lora_targets(family: ModelFamily, targets: str | list[str]) -> str | list[str]:
    """A preset name of the family, or the user's own list / regex, as peft target_modules."""
    if isinstance(targets, str) and targets in family.lora_presets:
        return family.lora_presets[targets]
    return targets


def build_model(recipe: Recipe, family: ModelFamily, weight_dtype: torch.dtype) -> torch.nn.Module:
    """Frozen transformer + trainable fp32 LoRA."""
    transformer = family.load_transformer(weight_dtype)
    transformer.requires_grad_(False)
    if recipe.lora.init_from:  # an existing adapter (any format): its weights, rank, alpha and targets
        from trainer.export import add_initial_adapter

        add_initial_adapter(transformer, recipe.lora, family)
    else:
        transformer.add_adapter(
            LoraConfig(
                r=recipe.lora.rank,
                lora_alpha=recipe.lora.alpha or recipe.lora.rank,
                lora_dropout=recipe.lora.dropout,
                target_modules=lora_targets(family, recipe.lora.targets),
                init_lora_weights=True,
            )
        )
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
    if recipe.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return apply_speed_options(transformer, recipe)  # attention backend, selective checkpointing, compile


def flow_loss(
    family: ModelFamily, transformer: torch.nn.Module, batch: dict[str, Any], recipe: Recipe, generator: torch.Generator
) -> torch.Tensor:
    """MSE between the transformer's prediction and the flow-matching velocity target."""
    t = recipe.train
    latents = batch["latents"]
    sigmas = sample_sigmas(
        latents.shape[0],
        t.timestep_sampling,
        t.shift or family.default_shift,
        generator,
        t.logit_mean,
        t.logit_std,
        t.sigmoid_scale,
    ).to(latents.device)
    noisy, target = noisy_and_target(latents, sigmas, generator)
    pred = family.predict(transformer, noisy, sigmas, batch)
    return F.mse_loss(pred.float(), target.float())


def train(recipe: Recipe, resume: str | None = None) -> Path:
    """Train and return the run folder; `resume` is a checkpoint folder or 'latest'."""
    t = recipe.train
    run = Path(t.output_dir)
    mixed_precision, weight_dtype = resolve_device_precision(t.mixed_precision, recipe.model.dtype)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation,
        log_with="wandb" if recipe.logging.wandb else None,
        project_dir=str(run),
    )
    set_seed(t.seed)
    family = get_family(recipe.model)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.toml").write_text(recipe_toml(recipe), encoding="utf-8")

    dataset = CachedDataset(recipe.data.cache_dir, seed=t.seed)
    if dataset.family != family.name:
        raise UserError(
            f"{recipe.data.cache_dir}: cache was prepared for {dataset.family!r}, recipe is {family.name!r}"
        )
    sampler = BucketBatchSampler(dataset, t.batch_size, seed=t.seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=partial(collate_batch, family), num_workers=t.dataloader_workers
    )
    transformer = build_model(recipe, family, DTYPES[weight_dtype])
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay, eps=t.adam_epsilon
    )
    # Stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    pos = Position()
    register_lora_only_state(accelerator)

    if resume:
        checkpoint = latest_checkpoint(run / "checkpoints") if resume == "latest" else Path(resume)
        if checkpoint is None:
            raise FileNotFoundError(f"{run / 'checkpoints'}: no complete checkpoint to resume from")
        accelerator.load_state(str(checkpoint))
        state = load_trainer_state(checkpoint)
        pos.load_state_dict(state["position"])
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s at step %d", checkpoint, pos.step)
    init_tracking(accelerator, recipe, run)
    meta = adapter_meta(recipe, family)
    bar = tqdm(total=t.max_steps, initial=pos.step, desc="train", disable=not accelerator.is_main_process)
    metrics_file = run / "metrics.jsonl"
    step_start, window_loss, window_n = time.perf_counter(), 0.0, 0

    while pos.step < t.max_steps:
        sampler.set_epoch(pos.epoch)
        dataset.set_epoch(pos.epoch)
        batches = accelerator.skip_first_batches(loader, pos.batch) if pos.batch else loader
        for batch in batches:
            with accelerator.accumulate(transformer):
                generator = step_generator(t.seed, pos.micro, accelerator.process_index)
                loss = flow_loss(family, transformer, batch, recipe, generator)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            pos.batch += 1
            pos.micro += 1
            window_loss += loss.detach().item()
            window_n += 1
            if not accelerator.sync_gradients:
                continue
            # one optimizer step done
            scheduler.step()
            pos.step += 1
            bar.update()
            if pos.step % t.log_every == 0 or pos.step == t.max_steps:
                now = time.perf_counter()
                logs = {
                    "loss": accelerator.reduce(
                        torch.tensor(window_loss / window_n, device=accelerator.device), "mean"
                    ).item(),
                    "lr": scheduler.get_last_lr()[0],
                    "step_time": (now - step_start) / t.log_every,
                    "samples_per_s": window_n * t.batch_size * accelerator.num_processes / (now - step_start),
                }
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                log_metrics(accelerator, bar, metrics_file, pos.step, logs)
                step_start, window_loss, window_n = now, 0.0, 0
            if pos.step % t.checkpoint_every == 0 or pos.step == t.max_steps:
                state = {"position": pos.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(
                    accelerator, run / "checkpoints", pos.step, transformer, meta, t.checkpoints_keep, state
                )
            if pos.step >= t.max_steps:
                break
        else:
            pos.epoch += 1
            pos.batch = 0
    bar.close()
    finish(accelerator, transformer, family, recipe, run, meta, pos.step)
    return run


def collate_batch(family: ModelFamily, items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate(items)
    batch.update(family.collate_text(batch.pop("text")))
    return batch


def register_lora_only_state(accelerator: Accelerator) -> None:
    """accelerate's save_state writes the whole model; keep only the trainable (LoRA) tensors."""

    def keep_lora(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            if i < len(weights):
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load_lora(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        while models:  # popped models are skipped by accelerate's own (whole-model) loading
            i = len(models) - 1
            model = models.pop()
            state = load_file(os.path.join(input_dir, "model.safetensors" if i == 0 else f"model_{i}.safetensors"))
            result = model.load_state_dict(state, strict=False)
            if result.unexpected_keys or set(state) == set():
                raise ValueError(
                    f"{input_dir}: checkpoint does not match this model's LoRA ({result.unexpected_keys[:3]})"
                )

    accelerator.register_save_state_pre_hook(keep_lora)
    accelerator.register_load_state_pre_hook(load_lora)


def init_tracking(accelerator: Accelerator, recipe: Recipe, run: Path) -> None:
    if not recipe.logging.wandb:
        return
    mode = recipe.logging.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    accelerator.init_trackers(
        recipe.logging.project,
        config=recipe.to_toml_dict(),
        init_kwargs={"wandb": {"name": recipe.logging.run_name or run.name, "dir": str(run), "mode": mode}},
    )


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def log_metrics(accelerator: Accelerator, bar: tqdm, metrics_file: Path, step: int, logs: dict[str, float]) -> None:
    accelerator.log(logs, step=step)
    if not accelerator.is_main_process:
        return
    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", s_per_step=f"{logs['step_time']:.2f}")
    if not math.isfinite(logs["loss"]):
        log.warning("step %d: non-finite loss %s", step, logs["loss"])
    with open(metrics_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def adapter_meta(recipe: Recipe, family: ModelFamily) -> dict[str, Any]:
    """What an exported adapter says about itself in its safetensors header."""
    return {
        "format": "vidlora",
        "family": family.name,
        "base_model": recipe.model.path,
        "rank": recipe.lora.rank,
        "alpha": recipe.lora.alpha or recipe.lora.rank,
        "target_modules": lora_targets(family, recipe.lora.targets),
        "trigger_words": sorted({d.trigger for d in recipe.data.datasets if d.trigger}),
        "recipe": recipe_toml(recipe),
    }


def finish(
    accelerator: Accelerator,
    transformer: torch.nn.Module,
    family: ModelFamily,
    recipe: Recipe,
    run: Path,
    meta: dict,
    steps: int,
) -> None:
    """Write the final adapter (canonical and diffusers format) and close the trackers."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from trainer.export import export_adapter

        save_adapter(run / ADAPTER, accelerator.unwrap_model(transformer), {**meta, "steps": steps})
        out = export_adapter(run / ADAPTER, run / "pytorch_lora_weights.safetensors", "diffusers", recipe.export.dtype)
        print(f"adapter: {out}")
    accelerator.end_training()


def recipe_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, for the run folder and the adapter header."""
    import tomli_w

    return tomli_w.dumps(recipe.to_toml_dict())
