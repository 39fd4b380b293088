"""`vidlora train`: LoRA training on cached latents under accelerate (one process, DDP or DeepSpeed ZeRO).

Setup first, then one explicit loop. The loop never branches on the model family: the family's adapter
turns a batch into a transformer call, and trainer/flow_matching.py supplies noise, timesteps and targets.

Exactness: data order is a function of (seed, epoch), noise and timesteps of (seed, micro-step, slot in
the global batch), LoRA dropout of (seed, micro-step, rank), and checkpoints are taken right after an
optimizer step, so a resumed run repeats an uninterrupted one bit for bit, and N processes with batch
size B train on what one process with batch size N x B would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, send_to_device, set_seed
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.dataset import BucketBatchSampler, CachedDataset, collate
from trainer.checkpoint import (
    ADAPTER,
    complete_checkpoints,
    gather_lora,
    latest_checkpoint,
    load_trainer_state,
    remove_partial,
    save_adapter,
    save_checkpoint,
    set_aside_newer,
)
from trainer.config import Recipe, UserError, resolve_device_precision
from trainer.flow_matching import noisy_and_target, sample_sigmas, step_generator
from trainer.memory import apply_memory_modes, make_optimizer, offload_base_weights
from trainer.models import get_family
from trainer.models.base import DTYPES, ModelFamily
from trainer.perf import apply_speed_options

log = logging.getLogger("vidlora.train")


class TrainingAborted(UserError):
    """Training stopped on purpose (too many non-finite steps); the message says why and what is intact."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved and training stopped cleanly."""


@dataclass
class Position:
    """Where training is; saved in every checkpoint so a resume continues at the same batch."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0
    batch: int = 0  # global batches consumed in this epoch
    micro: int = 0  # micro-batches consumed in total
    skipped: int = 0  # steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.__init__(**state)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (Slurm, torchrun) asks the loop to stop after the current step and save.

    A second signal within a second is ignored (`accelerate launch` forwards the terminal's Ctrl-C to ranks
    that already got it); a later one aborts at once without saving.
    """

    def __init__(self) -> None:
        self.requested = False
        self.first = 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested, self.first = True, time.monotonic()
            print(
                f"\nvidlora: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                "(Ctrl-C again to abort without saving)",
                flush=True,
            )
        elif time.monotonic() - self.first > 1.0:
            raise KeyboardInterrupt


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers share the terminal's process group: Ctrl-C must reach only the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def lora_targets(family: ModelFamily, targets: str | list[str]) -> str | list[str]:
    """A preset name of the family, or the user's own list / regex, as peft target_modules."""
    if isinstance(targets, str) and targets in family.lora_presets:
        return family.lora_presets[targets]
    return targets


def build_model(
    recipe: Recipe, family: ModelFamily, weight_dtype: torch.dtype, device: torch.device | None = None
) -> torch.nn.Module:
    """Frozen transformer + trainable fp32 LoRA, with the recipe's memory modes."""
    transformer = family.load_transformer(weight_dtype)
    transformer.requires_grad_(False)
    if recipe.train.block_offload:  # before the adapter, so the LoRA is never offloaded
        offload_base_weights(transformer, device or torch.device("cpu"))
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
            p.data = p.data.to(device or p.device, torch.float32)  # LoRA trains in fp32 whatever the base dtype
    apply_memory_modes(transformer, recipe.train)
    transformer.train()  # from_pretrained returns eval mode, where LoRA dropout does nothing
    return apply_speed_options(transformer, recipe)  # attention backend, selective checkpointing, compile


def flow_loss(
    family: ModelFamily,
    transformer: torch.nn.Module,
    batch: dict[str, Any],
    recipe: Recipe,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """MSE between the transformer's prediction and the flow-matching velocity target. Each sample draws
    its timestep and noise from its own generator (one per slot of the global batch)."""
    t = recipe.train
    latents = batch["latents"]
    sigmas, noisy, target = [], [], []
    for j, g in enumerate(generators):
        s = sample_sigmas(
            1, t.timestep_sampling, t.shift or family.default_shift, g, t.logit_mean, t.logit_std, t.sigmoid_scale
        )
        x, y = noisy_and_target(latents[j : j + 1], s, g)
        sigmas.append(s)
        noisy.append(x)
        target.append(y)
    pred = family.predict(transformer, torch.cat(noisy), torch.cat(sigmas).to(latents.device), batch)
    return F.mse_loss(pred.float(), torch.cat(target).float())


def make_accelerator(recipe: Recipe, run: Path, mixed_precision: str) -> Accelerator:
    t = recipe.train
    # DeepSpeed on the CPU (tests) needs gloo; without it accelerate and DeepSpeed disagree on the world size.
    cpu_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu_deepspeed else []
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation,
        log_with="wandb" if recipe.logging.wandb else None,
        project_dir=str(run),
        kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        configure_deepspeed(plugin, recipe)
        if t.fp8_base or t.block_offload:
            raise UserError("train.fp8_base and train.block_offload do not work under DeepSpeed (it owns the weights)")
    if t.block_offload and accelerator.num_processes > 1:
        raise UserError("train.block_offload is for one process (a model bigger than one GPU); use DeepSpeed ZeRO-3")
    return accelerator


def configure_deepspeed(plugin: Any, recipe: Recipe) -> None:
    """The recipe decides batch size, accumulation and clipping. DeepSpeed's config would silently win over
    the Accelerator's arguments, so "auto" entries are filled from the recipe and a number that disagrees
    is an error."""
    t = recipe.train
    cfg = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in wanted.items():
        have = cfg.get(key, "auto")
        if have == "auto":
            cfg[key] = value
        elif float(have) != float(value):
            raise UserError(
                f'DeepSpeed config sets {key} = {have} but the recipe says {value}: set it to "auto" in the '
                "DeepSpeed config (the recipe decides)"
            )
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the three above and the world size


def train(recipe: Recipe, resume: str | None = None) -> Path:
    """Train and return the run folder; `resume` is a checkpoint folder or 'latest'."""
    t, v = recipe.train, recipe.validation
    run = Path(t.output_dir)
    mixed_precision, weight_dtype = resolve_device_precision(t.mixed_precision, recipe.model.dtype)
    accelerator = make_accelerator(recipe, run, mixed_precision)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(t.seed)
    family = get_family(recipe.model)
    checkpoints = run / "checkpoints"
    checkpoint = find_resume_checkpoint(run, resume)

    dataset = CachedDataset(recipe.data.cache_dir, seed=t.seed, holdout_clips=v.holdout_clips)
    if dataset.family != family.name:
        raise UserError(
            f"{recipe.data.cache_dir}: cache was prepared for {dataset.family!r}, recipe is {family.name!r}"
        )
    sampler = BucketBatchSampler(dataset, t.batch_size, seed=t.seed, num_replicas=world, rank=rank)
    workers = t.dataloader_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(collate_batch, family),
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_sigint if workers else None,
        pin_memory=device.type == "cuda",
    )
    transformer = build_model(recipe, family, DTYPES[weight_dtype], device if t.block_offload else None)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    # Stepped by hand once per optimizer step (prepared, accelerate would step it once per process).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
    if t.block_offload:  # the offloaded base weights stay where they are; only the LoRA lives on the GPU
        transformer = accelerator.prepare_model(transformer, device_placement=False)
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    if not deepspeed:
        register_lora_only_state(accelerator)

    pos = Position()
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        check_resumable(state, recipe, world, deepspeed)
        if deepspeed:
            accelerator.load_state(str(checkpoint), load_module_strict=False)
        else:
            accelerator.load_state(str(checkpoint))
        pos.load_state_dict(state["position"])
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s at step %d", checkpoint, pos.step)
    if accelerator.is_main_process:
        start_run_folder(run, recipe, checkpoint, pos.step)
    accelerator.wait_for_everyone()

    init_tracking(accelerator, recipe, run)
    meta = adapter_meta(recipe, family)
    validator = None
    if v.every:
        from trainer.validation import Validator

        validator = Validator(recipe, family, dataset, accelerator, run)
        if v.at_start and checkpoint is None:
            log_validation(accelerator, run, validator.run(transformer, 0), 0)
    bar = tqdm(total=t.max_steps, initial=pos.step, desc="train", disable=not accelerator.is_main_process)
    window = Window()
    bad_in_row = 0

    with StopRequest() as stop:
        while pos.step < t.max_steps:
            sampler.set_epoch(pos.epoch, skip=pos.batch)
            for batch in loader:
                batch = send_to_device(batch, device, non_blocking=True)
                n = len(batch["files"])
                slots = [rank * n + j for j in range(n)]  # this rank's places in the global batch
                with accelerator.accumulate(transformer):
                    loss = forward_backward(accelerator, family, transformer, batch, recipe, pos.micro, slots)
                pos.batch += 1
                pos.micro += 1
                window.add(loss.item(), n, batch["files"])
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step: all ranks agree on skipping and stopping with one reduce ----
                bad, stop_now = window.end_step(accelerator, stop.requested)
                grad_norm, skipped = optimizer_step(accelerator, params, optimizer, scheduler, t.max_grad_norm, bad)
                pos.step += 1
                bar.update()
                if skipped:
                    pos.skipped += 1
                    bad_in_row += 1
                    warn_skipped(accelerator, window, pos, grad_norm, bad_in_row)
                else:
                    bad_in_row = 0
                if bad_in_row >= t.max_nonfinite_in_row:
                    raise TrainingAborted(aborted_message(run, pos.step, bad_in_row))
                if pos.step % t.log_every == 0 or pos.step == t.max_steps or stop_now:
                    log_metrics(accelerator, bar, run, pos, window.logs(scheduler, grad_norm, pos))
                pause = time.perf_counter()
                if pos.step % t.checkpoint_every == 0 or pos.step == t.max_steps or stop_now:
                    state = {
                        "position": pos.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        **run_shape(recipe, world, deepspeed),
                    }
                    saved = save_checkpoint(
                        accelerator, checkpoints, pos.step, transformer, meta, t.checkpoints_keep, state
                    )
                if validator and (pos.step % v.every == 0 or pos.step == t.max_steps) and not stop_now:
                    log_validation(accelerator, run, validator.run(transformer, pos.step), pos.step)
                window.pause(time.perf_counter() - pause)
                if stop_now:
                    bar.close()
                    accelerator.end_training()
                    raise Interrupted(f"stopped at step {pos.step}; checkpoint: {saved}")
                if pos.step >= t.max_steps:
                    break
            else:
                pos.epoch += 1
                pos.batch = 0
    bar.close()
    finish(accelerator, transformer, family, recipe, run, meta, pos.step)
    return run


def forward_backward(
    accelerator: Accelerator,
    family: ModelFamily,
    transformer: torch.nn.Module,
    batch: dict[str, Any],
    recipe: Recipe,
    micro: int,
    slots: list[int],
) -> torch.Tensor:
    """One micro-batch: loss and backward. Dropout, noise and timesteps are seeded from (seed, micro-step,
    slot in the global batch), so resumes and different process counts draw exactly the same numbers."""
    seed = recipe.train.seed
    torch.manual_seed(step_seed(seed, micro, accelerator.process_index))  # LoRA dropout
    loss = flow_loss(family, transformer, batch, recipe, [step_generator(seed, micro, s) for s in slots])
    accelerator.backward(loss)  # under DeepSpeed this also steps (or skips a non-finite step)
    return loss


def optimizer_step(
    accelerator: Accelerator, params: list, optimizer: Any, scheduler: Any, max_grad_norm: float, bad: bool
) -> tuple[float, bool]:
    """Clip, step (unless a loss or the gradient is non-finite), zero, advance the LR: (grad norm, skipped)."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or math.inf)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)
    skipped = bad or not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()  # a no-op under DeepSpeed, which stepped in backward
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, skipped


def step_seed(seed: int, micro: int, rank: int) -> int:
    return ((seed * 1_000_003 + micro) * 4099 + rank) % (2**63)


class Window:
    """Loss, samples and time since the last log; the per-step flags every rank must agree on."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loss_sum = self.loss_n = self.samples = self.steps = 0.0
        self.local_bad: list[str] = []  # this step's cache files whose loss was non-finite (this rank)
        self.step_bad = self.step_loss = self.step_n = self.step_samples = 0.0

    def add(self, loss: float, n: int, files: list[str]) -> None:
        if math.isfinite(loss):
            self.step_loss += loss
            self.step_n += 1
        else:
            self.step_bad += 1
            self.local_bad += files
        self.step_samples += n

    def end_step(self, accelerator: Accelerator, stop: bool) -> tuple[bool, bool]:
        """Reduce this step's numbers over ranks; returns (some loss was non-finite, stop requested)."""
        local = [self.step_bad, float(stop), self.step_loss, self.step_n, self.step_samples]
        total = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum")
        bad, stop_any, loss, n, samples = total.tolist()
        self.last_bad_files, self.local_bad = self.local_bad, []
        self.step_bad = self.step_loss = self.step_n = self.step_samples = 0.0
        if not bad:
            self.loss_sum += loss
            self.loss_n += n
        self.samples += samples
        self.steps += 1
        return bad > 0, stop_any > 0

    def pause(self, seconds: float) -> None:
        """Checkpoints and validation do not count as step time."""
        self.start += seconds

    def logs(self, scheduler: Any, grad_norm: float, pos: Position) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        logs = {
            "loss": self.loss_sum / self.loss_n if self.loss_n else float("nan"),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "step_time": elapsed / self.steps,
            "samples_per_s": self.samples / elapsed,
            "memory_gb": memory_gb(),
            "skipped_steps": pos.skipped,
            "epoch": pos.epoch,
        }
        self.start, self.loss_sum, self.loss_n, self.samples, self.steps = now, 0.0, 0.0, 0.0, 0.0
        return logs


def memory_gb() -> float:
    """Peak GPU memory allocated since the last log (CUDA), else this process's resident memory."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def warn_skipped(accelerator: Accelerator, window: Window, pos: Position, grad_norm: float, in_row: int) -> None:
    files = f" (cache files on rank {accelerator.process_index}: {', '.join(window.last_bad_files)})"
    what = "loss" if window.last_bad_files else f"gradient (norm {grad_norm})"
    if window.last_bad_files or accelerator.is_main_process:
        tqdm.write(
            f"vidlora: step {pos.step}: non-finite {what}{files if window.last_bad_files else ''}; "
            f"step skipped ({in_row} in a row, {pos.skipped} in total)"
        )


def aborted_message(run: Path, step: int, in_row: int) -> str:
    last = latest_checkpoint(run / "checkpoints")
    where = f"the last checkpoint {last} is intact" if last else "no checkpoint was written yet"
    return (
        f"{in_row} steps in a row had a non-finite loss or gradient (last at step {step}): stopping; {where}. "
        "Check the cache files named above, lower train.learning_rate, or raise train.max_nonfinite_in_row"
    )


def run_shape(recipe: Recipe, world: int, deepspeed: bool) -> dict[str, Any]:
    """What a checkpoint's data position and optimizer shards depend on."""
    t = recipe.train
    return {
        "world_size": world,
        "batch_size": t.batch_size,
        "gradient_accumulation": t.gradient_accumulation,
        "seed": t.seed,
        "deepspeed": deepspeed,
    }


def check_resumable(state: dict, recipe: Recipe, world: int, deepspeed: bool) -> None:
    saved = {k: state.get(k) for k in run_shape(recipe, world, deepspeed)}
    now = run_shape(recipe, world, deepspeed)
    if saved["deepspeed"] != deepspeed or (deepspeed and saved["world_size"] != world):
        raise UserError(
            f"checkpoint was saved with deepspeed={saved['deepspeed']} on {saved['world_size']} processes; "
            f"resume it the same way (now: deepspeed={deepspeed}, {world} processes)"
        )
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if saved[k] is not None and saved[k] != now[k]]
    if changed:
        log.warning("resuming with %s: the run continues, but not as the uninterrupted run would", ", ".join(changed))


def find_resume_checkpoint(run: Path, resume: str | None) -> Path | None:
    checkpoints = run / "checkpoints"
    if not resume:
        done = complete_checkpoints(checkpoints)
        if done:
            raise UserError(
                f"{checkpoints} already holds {done[-1].name}: resume with --resume, or choose another train.output_dir"
            )
        return None
    checkpoint = latest_checkpoint(checkpoints) if resume == "latest" else Path(resume)
    if checkpoint is None:
        raise FileNotFoundError(f"{checkpoints}: no complete checkpoint to resume from")
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete vidlora checkpoint (no trainer_state.json)")
    return checkpoint


def start_run_folder(run: Path, recipe: Recipe, checkpoint: Path | None, step: int) -> None:
    """Write the recipe; on resume, drop what happened after the checkpoint (metrics, newer checkpoints)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.toml").write_text(recipe_toml(recipe), encoding="utf-8")
    remove_partial(run / "checkpoints")
    if checkpoint is None:
        return
    for moved in set_aside_newer(run / "checkpoints", step):
        log.warning("resuming from step %d: newer checkpoint moved to %s", step, moved)
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        from data.cache import atomic_write

        atomic_write(metrics, lambda p: Path(p).write_text(text, encoding="utf-8"))


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
    """wandb (offline without a key); a resumed run continues the same wandb run."""
    if not recipe.logging.wandb:
        return
    mode = recipe.logging.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    id_file = run / "wandb_id"
    if accelerator.is_main_process and not id_file.is_file():
        import secrets

        id_file.write_text(secrets.token_hex(4))
    accelerator.wait_for_everyone()
    accelerator.init_trackers(
        recipe.logging.project,
        config=recipe.to_toml_dict(),
        init_kwargs={
            "wandb": {
                "name": recipe.logging.run_name or run.name,
                "dir": str(run),
                "mode": mode,
                "id": id_file.read_text().strip(),
                "resume": "allow",
            }
        },
    )


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def format_metrics(step: int, total: int | None, logs: dict[str, float]) -> str:
    """The console line: the same numbers metrics.jsonl holds, rounded for reading."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    for key, fmt in FORMATS.items():
        if key in logs:
            parts.append(f"{key} {logs[key]:{fmt}}")
    return "  ".join(parts)


FORMATS = {
    "loss": ".5f",
    "val_loss": ".5f",
    "lr": ".3e",
    "grad_norm": ".4f",
    "step_time": ".3f",
    "samples_per_s": ".2f",
    "memory_gb": ".2f",
    "skipped_steps": "d",
    "epoch": "d",
}


def log_metrics(accelerator: Accelerator, bar: tqdm, run: Path, pos: Position, logs: dict[str, float]) -> None:
    accelerator.log(logs, step=pos.step)
    if not accelerator.is_main_process:
        return
    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    tqdm.write(format_metrics(pos.step, bar.total, logs))
    append_metrics(run, {"step": pos.step, **logs})


def log_validation(accelerator: Accelerator, run: Path, logs: dict[str, float], step: int) -> None:
    if not logs:
        return
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        tqdm.write(format_metrics(step, None, logs))
        append_metrics(run, {"step": step, **logs})


def append_metrics(run: Path, row: dict[str, Any]) -> None:
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


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
    """Write the final adapter: canonical, diffusers (`pytorch_lora_weights.safetensors`, the name
    `load_lora_weights` looks for in a folder) and every other format of `export.formats`."""
    accelerator.wait_for_everyone()
    lora = gather_lora(accelerator, transformer)  # every rank: ZeRO-3 gathers
    if accelerator.is_main_process:
        from trainer.export import export_adapter, export_files

        save_adapter(run / ADAPTER, accelerator.unwrap_model(transformer), {**meta, "steps": steps}, lora)
        out = export_adapter(run / ADAPTER, run / "pytorch_lora_weights.safetensors", "diffusers", recipe.export.dtype)
        print(f"adapter: {out}")
        others = [f for f in recipe.export.formats if f != "diffusers"]
        for written in export_files([run / ADAPTER], others, out_dir=run, dtype=recipe.export.dtype) if others else []:
            print(f"adapter ({written.fmt}): {written.path}")
    accelerator.end_training()


def recipe_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, for the run folder and the adapter header."""
    import tomli_w

    return tomli_w.dumps(recipe.to_toml_dict())
