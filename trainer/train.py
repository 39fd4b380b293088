"""`vidlora train`: LoRA training on cached latents under accelerate (one process, DDP or DeepSpeed ZeRO).

Setup first, then one explicit loop. The loop never branches on the model family: the family's adapter
turns a batch into a transformer call, and trainer/flow_matching.py supplies noise, timesteps and targets.

Exactness: data order is a function of (seed, epoch), noise and timesteps of (seed, micro-step, slot in
the global batch), LoRA dropout of (seed, micro-step, rank), and checkpoints are taken right after an
optimizer step, so a resumed run repeats an uninterrupted one bit for bit, and N processes with batch
size B train on what one process with batch size N x B would.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    send_to_device,
    set_seed,
)
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.dataset import BucketBatchSampler, CachedDataset, collate
from data.plan import dataset_names
from trainer.checkpoint import (
    adapter_name,
    check_resumable,
    denoiser_meta,
    find_resume_checkpoint,
    finished,
    gather_lora,
    is_fsdp,
    load_scheduler,
    load_trainer_state,
    lock_run_folder,
    register_lora_only_state,
    run_shape,
    save_adapter,
    save_checkpoint,
    start_run_folder,
)
from trainer.config import Recipe, UserError, resolve_device_precision
from trainer.ema import LoraEMA
from trainer.flow_matching import (
    flow_mse,
    noisy_and_target,
    route,
    sample_mse,
    sample_sigmas,
    sigma_mass,
    step_generator,
)
from trainer.memory import apply_memory_modes, fp8_compute_problem, make_optimizer, offload_base_weights
from trainer.models import get_family
from trainer.models.base import DTYPES, Denoiser, Denoisers, ModelFamily
from trainer.parallel import check_context_parallel, device_mesh, enable_context_parallel, layout
from trainer.perf import apply_speed_options, batch_step_flops, device_peak_flops, grid_tokens
from trainer.routing import ROUTED, draw_routed
from trainer.tracking import Window, engine, init_tracking, log_metrics, log_validation, report_end, report_start

log = logging.getLogger("vidlora.train")


class TrainingAborted(UserError):
    """Training stopped on purpose (too many non-finite steps); the message says why and what is intact."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved (unless inside a non-finite streak) and training stopped."""

    def __init__(self, step: int, checkpoint: Path | None, in_streak: bool) -> None:
        unsaved = " inside a non-finite streak, not saved" if in_streak else ""
        super().__init__(f"stopped at step {step}{unsaved}; checkpoint: {checkpoint or 'none yet'}")


@dataclass
class Position:
    """Where training is; saved in every checkpoint so a resume continues at the same batch."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0
    batch: int = 0  # global batches consumed in this epoch
    micro: int = 0  # micro-batches consumed in total
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    experts: dict[str, int] = field(default_factory=dict)  # steps each expert trained (two-expert families)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (Slurm, torchrun) asks the loop to stop after the current step and save.

    A repeated SIGTERM is ignored (Slurm signals every process of the job, and the launcher forwards it to
    the ranks again), as is a second Ctrl-C within a second (`accelerate launch` forwards the terminal's
    Ctrl-C to ranks that already got it); a later Ctrl-C aborts at once without saving.
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
        elif signum == signal.SIGINT and time.monotonic() - self.first > 1.0:
            raise KeyboardInterrupt


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers get the trainer's Ctrl-C (same process group) and SIGTERM (Slurm signals every
    process; torchrun signals each rank's group), and a dead worker kills the loop before it can save:
    only the trainer may act on them. The trainer stops its workers through their queues."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def lora_targets(family: ModelFamily, targets: str | list[str]) -> str | list[str]:
    """A preset name of the family, or the user's own list / regex, as peft target_modules."""
    if isinstance(targets, str) and targets in family.lora_presets:
        return family.lora_presets[targets]
    return targets


def build_model(
    recipe: Recipe, family: ModelFamily, weight_dtype: torch.dtype, device: torch.device | None = None
) -> Denoisers:
    """The denoisers the run trains (one, or two experts): each a frozen transformer with a trainable fp32 LoRA
    and the recipe's memory and speed modes."""
    models = {d.component: build_denoiser(recipe, family, d, weight_dtype, device) for d in family.trained_denoisers()}
    routing = tuple(recipe.train.token_routing_blocks) if recipe.train.token_routing else None
    return Denoisers(family, models, routing)  # refuses routing the family or its blocks cannot do, by name


def build_denoiser(
    recipe: Recipe, family: ModelFamily, denoiser: Denoiser, weight_dtype: torch.dtype, device: torch.device | None
) -> torch.nn.Module:
    transformer = family.load_transformer(weight_dtype, denoiser)
    transformer.requires_grad_(False)
    if recipe.train.block_offload:  # before the adapter, so the LoRA is never offloaded
        offload_base_weights(transformer, device or torch.device("cpu"))
    if recipe.lora.init_from:  # an existing adapter (any format): its weights, rank, alpha and targets
        from trainer.export import add_initial_adapter

        add_initial_adapter(transformer, recipe.lora, family, denoiser)
    else:
        from trainer.export import adapter_config

        lora = recipe.lora
        targets = lora_targets(family, lora.targets)
        transformer.add_adapter(adapter_config(lora.kind, lora.rank, lora.alpha or lora.rank, lora.dropout, targets))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.to(device or p.device, torch.float32)  # LoRA trains in fp32 whatever the base dtype
    apply_memory_modes(transformer, recipe.train)
    transformer.train()  # from_pretrained returns eval mode, where LoRA dropout does nothing
    return apply_speed_options(transformer, recipe)  # attention backend, selective checkpointing, compile


def flow_loss(
    model: Denoisers,
    batch: dict[str, Any],
    recipe: Recipe,
    generators: list[torch.Generator],
    denoiser: Denoiser | None = None,
    input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The loss of a micro-batch (`flow_terms`)."""
    return flow_mse(*flow_terms(model, batch, recipe, generators, denoiser, input_dtype))


def flow_terms(
    model: Denoisers,
    batch: dict[str, Any],
    recipe: Recipe,
    generators: list[torch.Generator],
    denoiser: Denoiser | None = None,
    input_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(prediction, target, weight) of the MSE between the denoiser's prediction and the flow-matching velocity target. Each sample draws its timestep
    (from the denoiser's range of noise levels), noise and the family's own choices (e.g. a first frame given or not)
    from its own generator (one per slot of the global batch); the family may leave parts out of the loss.
    `model` is the run's Denoisers, or what wraps it (DDP, DeepSpeed); `input_dtype`: the dtype the model takes its
    inputs in, when it does not autocast (DeepSpeed)."""
    t = recipe.train
    family = unwrapped(model).family
    denoiser = denoiser or family.trained_denoisers()[0]
    latents = batch["latents"]
    sigmas, noisy, target = [], [], []
    shift = t.shift or family.default_shift
    for j, g in enumerate(generators):
        s = sample_sigmas(
            1, t.timestep_sampling, shift, g, t.logit_mean, t.logit_std, t.sigmoid_scale, sigma_range=denoiser.sigmas
        )
        x, y = noisy_and_target(latents[j : j + 1], s, g)
        sigmas.append(s)
        noisy.append(x)
        target.append(y)
    batch = {**batch, **family.draw_conditions(t, generators)}
    if t.token_routing:  # drawn last, so with routing off every other draw is what it always was
        config = unwrapped(model).experts[denoiser.component].config
        tokens = grid_tokens(family.patch_of(dict(config)), tuple(latents.shape[1:]))
        batch[ROUTED] = draw_routed(tokens, t.token_routing, generators).to(latents.device)
    noisy = torch.cat(noisy).to(input_dtype or latents.dtype)
    pred = model(denoiser.component, noisy, torch.cat(sigmas).to(latents.device), batch)
    return pred, torch.cat(target), loss_weight(family.loss_weight(batch), batch.get("mask"))


def loss_weight(*weights: torch.Tensor | None) -> torch.Tensor | None:
    """The product of the family's weight and the samples' loss masks (each broadcastable to the latents)."""
    given = [w for w in weights if w is not None]
    return math.prod(given[1:], start=given[0]) if given else None


def unwrapped(model: torch.nn.Module) -> Denoisers:
    """The Denoisers inside DDP / DeepSpeed / compile wrappers."""
    while not isinstance(model, Denoisers):
        model = model.module
    return model


def step_denoiser(recipe: Recipe, family: ModelFamily, step: int) -> Denoiser:
    """The denoiser an optimizer step trains: with several, one picked with its share of the noise distribution,
    from (seed, step) only, so every process and a resumed run agree (trainer/flow_matching.py)."""
    trained = family.trained_denoisers()
    if len(trained) == 1:
        return trained[0]
    t = recipe.train
    params = {"logit_mean": t.logit_mean, "logit_std": t.logit_std, "sigmoid_scale": t.sigmoid_scale}
    shift = t.shift or family.default_shift
    masses = [sigma_mass(d.sigmas, t.timestep_sampling, shift, **params) for d in trained]
    return trained[route(t.seed, step, masses)]


def make_accelerator(recipe: Recipe, run: Path, mixed_precision: str, experts: int = 1) -> Accelerator:
    t = recipe.train
    # DeepSpeed on the CPU (tests) needs gloo; without it accelerate and DeepSpeed disagree on the world size.
    cpu_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
    handlers: list[Any] = [InitProcessGroupKwargs(backend="gloo")] if cpu_deepspeed else []
    if experts > 1:  # a step trains one expert: DDP must expect the others' parameters to get no gradient
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one precision per process and refuses another: a notebook or a sweep that trains a bf16
        # recipe after an fp32 one starts from a fresh state (a launched rank trains one recipe: its state stays)
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation,
        log_with="wandb" if recipe.logging.wandb else None,
        project_dir=str(run),
        kwargs_handlers=handlers,
    )
    check_launch(accelerator)
    cpu_fsdp(accelerator)
    if accelerator.is_main_process:
        print(f"vidlora train: {engine(accelerator)}", flush=True)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        configure_deepspeed(plugin, recipe)
    if (plugin is not None or is_fsdp(accelerator)) and (t.fp8_base or t.block_offload):
        raise UserError(
            "train.fp8_base and train.block_offload do not work under DeepSpeed or FSDP (they own the weights)"
        )
    if is_fsdp(accelerator) and recipe.lora.kind == "dora":
        raise UserError(
            "lora.kind = 'dora' does not work under FSDP: its ComfyUI scale is computed from the whole base weights, "
            "which FSDP keeps sharded; train DoRA with DDP"
        )
    if t.block_offload and accelerator.num_processes > 1:
        raise UserError("train.block_offload is for one process (a model bigger than one GPU); use DeepSpeed ZeRO-3")
    if t.fp8_compute and (problem := fp8_compute_problem(accelerator.device)):
        raise UserError(f"train.fp8_compute = {t.fp8_compute!r}: {problem}")
    if t.offload_inactive_expert and (accelerator.num_processes > 1 or plugin is not None):
        raise UserError("train.offload_inactive_expert is for one process without DeepSpeed; use DeepSpeed ZeRO-3")
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Stop a launch that would not run what it asks for, before anything is loaded or written."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"{launched} processes were launched but each one runs alone ({accelerator.num_processes} process): "
            "they would race on one run folder. Without GPUs, launch DDP with `ACCELERATE_USE_CPU=true "
            "accelerate launch --multi_gpu --num_processes N ...` (docs/training.md)"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and accelerator.state.deepspeed_plugin is None:
        raise UserError(
            "the accelerate config asks for DeepSpeed, but ACCELERATE_USE_CPU=true (or --cpu) turns it into plain "
            "DDP: launch DeepSpeed configs without it, also on a CPU (docs/training.md)"
        )


def cpu_fsdp(accelerator: Accelerator) -> None:
    """An FSDP config launched on the CPU (tests; `ACCELERATE_USE_CPU=true`): accelerate 1.15 switches FSDP on only
    for accelerator devices (AcceleratorState lists MULTI_GPU, MULTI_NPU, ...; a CPU launch stays MULTI_CPU, silently
    plain DDP), though torch's fully_shard runs over gloo. Switch it on the way accelerate does on a GPU."""
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP") != "true" or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as on a GPU
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


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
    started = time.monotonic()
    t, v = recipe.train, recipe.validation
    run = Path(t.output_dir)
    mixed_precision, weight_dtype = resolve_device_precision(t.mixed_precision, recipe.model.dtype)
    family = get_family(recipe.model)
    family.check_train(t)
    accelerator = make_accelerator(recipe, run, mixed_precision, len(family.trained_denoisers()))
    _lock = lock_run_folder(run) if accelerator.is_main_process else None  # held until train() returns
    deepspeed = accelerator.state.deepspeed_plugin is not None
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(t.seed)
    checkpoints = run / "checkpoints"
    if resume == "latest" and finished(run, t.max_steps, accelerator.is_main_process):
        return run
    checkpoint = find_resume_checkpoint(run, resume, accelerator.is_main_process)

    names = dict(zip(dataset_names(recipe.data.datasets), recipe.data.datasets))
    dataset = CachedDataset(
        recipe.data.cache_dir,
        seed=t.seed,
        holdout_clips=v.holdout_clips,
        caption_dropout=t.caption_dropout,
        mask_weights={name: d.mask_weight for name, d in names.items()},
        regularisation={name: d.share for name, d in names.items() if d.role == "regularisation"},
    )
    if dataset.family != family.name:
        raise UserError(
            f"{recipe.data.cache_dir}: cache was prepared for {dataset.family!r}, recipe is {family.name!r}"
        )
    shapes = [dataset.shape_key(i) for i in range(len(dataset))]
    family.check_shapes(shapes, f"{recipe.data.cache_dir}: sample size")
    check_context_parallel(t, family, world, device, deepspeed, shapes)
    cp = layout(t.context_parallel, rank, world)  # a context-parallel group shares one sample stream
    sampler = BucketBatchSampler(dataset, t.batch_size, seed=t.seed, num_replicas=cp.dp, rank=cp.dp_rank)
    workers = t.dataloader_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(collate_batch, family),
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals if workers else None,
        pin_memory=device.type == "cuda",
    )
    model = build_model(recipe, family, DTYPES[weight_dtype], device if t.block_offload else None)
    if cp.degree > 1:
        mesh = device_mesh(cp.degree, t.context_parallel_kind, world, device)
        for expert in model.experts.values():
            enable_context_parallel(expert, family.context_parallel_plan(), t.context_parallel_kind, mesh, device)
        if accelerator.is_main_process:
            print(
                f"vidlora train: context parallel ({t.context_parallel_kind}): {cp.dp} group(s) of {cp.degree} "
                "processes, each sample's sequence split across its group",
                flush=True,
            )
    groups = expert_param_groups(model, t)
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, t)
    # Stepped by hand once per optimizer step (prepared, accelerate would step it once per process).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
    if t.block_offload or t.offload_inactive_expert:  # base weights stay where they are; the LoRA goes to the GPU
        model = accelerator.prepare_model(model, device_placement=False)
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    fsdp = is_fsdp(accelerator)
    if fsdp:  # fully_shard replaced the parameters (DTensors): clip those
        params = [p for g in optimizer.param_groups for p in g["params"]]
    if not deepspeed:
        register_lora_only_state(accelerator, model)
    ema = LoraEMA(unwrapped(model), t.ema_decay, t.ema_on_cpu) if t.ema_decay else None

    pos = Position()
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        check_resumable(state, recipe, world, deepspeed, fsdp)
        if deepspeed:
            accelerator.load_state(str(checkpoint), load_module_strict=False)
        else:
            accelerator.load_state(str(checkpoint))
        pos.load_state_dict(state["position"])
        load_scheduler(scheduler, state["scheduler"], t.learning_rate)
        if ema:
            ema.load(checkpoint)
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
            log_validation(accelerator, run, validate(validator, model, ema, 0), 0)
    report_start(accelerator, recipe, dataset, sampler, params, checkpoint, pos.step)
    bar = tqdm(total=t.max_steps, initial=pos.step, desc="train", disable=not accelerator.is_main_process)
    window = Window(peak_flops(accelerator))
    bad_in_row = 0
    saved = checkpoint  # the newest checkpoint; `good`: the newest whose weights then gave a finite step
    good = None

    with StopRequest() as stop:
        while pos.step < t.max_steps:
            sampler.set_epoch(pos.epoch, skip=pos.batch)
            for batch in loader:
                batch = send_to_device(batch, device, non_blocking=True)
                n = len(batch["files"])
                slots = [cp.dp_rank * n + j for j in range(n)]  # this group's places in the global batch
                denoiser = step_denoiser(recipe, family, pos.step)  # the same for every micro-batch of a step
                activate(model, optimizer, scheduler, denoiser, t.offload_inactive_expert, device)
                with accelerator.accumulate(model):
                    loss, reg = forward_backward(
                        accelerator, model, batch, recipe, pos.micro, slots, denoiser, cp.degree
                    )
                pos.batch += 1
                pos.micro += 1
                expert = unwrapped(model).experts[denoiser.component]
                flops = batch_step_flops(expert, family.name, batch, recipe).model
                if not cp.lead:  # a context-parallel group counts its samples once
                    n, flops, reg = 0, 0.0, (0.0, 0)
                window.add(loss.item(), n, batch["files"], flops, denoiser.label, reg)
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step: all ranks agree on skipping and stopping with one reduce ----
                bad, stop_now = window.end_step(accelerator, stop.requested)
                grad_norm, skipped = optimizer_step(accelerator, params, optimizer, scheduler, t.max_grad_norm, bad)
                if ema and not skipped:
                    ema.update()
                pos.step += 1
                if denoiser.label:
                    pos.experts[denoiser.label] = pos.experts.get(denoiser.label, 0) + 1
                bar.update()
                if skipped:
                    pos.skipped += 1
                    bad_in_row += 1
                    warn_skipped(accelerator, window, pos, grad_norm, bad_in_row)
                else:
                    bad_in_row, good = 0, saved  # skipped steps left the weights as `saved` holds them
                if bad_in_row >= t.max_nonfinite_in_row:
                    bar.close()
                    raise TrainingAborted(aborted_message(pos.step, bad_in_row, good, saved))
                if pos.step % t.log_every == 0 or pos.step == t.max_steps or stop_now:
                    log_metrics(accelerator, bar, run, pos, window.logs(scheduler, grad_norm, pos))
                pause = time.perf_counter()
                due = pos.step % t.checkpoint_every == 0 or pos.step == t.max_steps or stop_now
                if due and not bad_in_row:  # never a state inside a non-finite streak
                    state = {
                        "position": pos.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        **run_shape(recipe, world, deepspeed, fsdp),
                    }
                    saved = save_checkpoint(
                        accelerator, checkpoints, pos.step, model, meta, t.checkpoints_keep, state, ema
                    )
                if validator and (pos.step % v.every == 0 or pos.step == t.max_steps) and not stop_now:
                    log_validation(accelerator, run, validate(validator, model, ema, pos.step), pos.step)
                window.pause(time.perf_counter() - pause)
                if stop_now:
                    bar.close()
                    accelerator.end_training()
                    raise Interrupted(pos.step, saved, in_streak=bad_in_row > 0)
                if pos.step >= t.max_steps:
                    break
            else:
                pos.epoch += 1
                pos.batch = 0
    bar.close()
    written = finish(accelerator, model, family, recipe, run, meta, pos.step, ema)
    report_end(accelerator, run, pos, started, written)
    return run


def validate(validator: Any, model: torch.nn.Module, ema: LoraEMA | None, step: int) -> dict[str, float]:
    """Validation logs of the raw weights, and of the EMA (`ema_` keys, videos in validation/ema/) if there is one."""
    logs = validator.run(model, step)
    if ema is not None:
        with ema.applied():
            logs |= {f"ema_{k}": v for k, v in validator.run(model, step, "ema").items()}
    return logs


def forward_backward(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batch: dict[str, Any],
    recipe: Recipe,
    micro: int,
    slots: list[int],
    denoiser: Denoiser | None = None,
    context_parallel: int = 1,
) -> tuple[torch.Tensor, tuple[float, int]]:
    """One micro-batch through one denoiser: loss and backward. Dropout, noise and timesteps are seeded from (seed,
    micro-step, slot in the global batch), so resumes and different process counts draw exactly the same numbers.
    Under context parallelism the backward loss is scaled by the degree (trainer/parallel.py says why). Returns the
    loss and (sum, count) of the regularisation samples' losses in it."""
    seed = recipe.train.seed
    torch.manual_seed(step_seed(seed, micro, accelerator.process_index))  # LoRA dropout
    generators = [step_generator(seed, micro, s) for s in slots]
    pred, target, weight = flow_terms(model, batch, recipe, generators, denoiser, deepspeed_input_dtype(accelerator))
    loss = flow_mse(pred, target, weight)
    accelerator.backward(loss * context_parallel)  # under DeepSpeed this also steps (or skips a non-finite step)
    reg = batch.get("regularisation")
    if reg is None or not reg.any():
        return loss, (0.0, 0)
    with torch.no_grad():
        each = sample_mse(pred, target, weight)
    return loss, (each[reg].sum().item(), int(reg.sum()))


def expert_param_groups(model: Denoisers, t: Any) -> list[dict[str, Any]]:
    """One optimizer parameter group per trained denoiser (its LoRA), with its learning-rate factor."""
    labels = {c: model.family.trained_denoisers()[i].label for i, c in enumerate(model.experts)}
    unknown = sorted(set(t.expert_lr_scale) - set(labels.values()))
    if unknown:
        raise UserError(f"train.expert_lr_scale: no expert {unknown} here; experts: {sorted(labels.values())}")
    return [
        {
            "params": [p for p in expert.parameters() if p.requires_grad],
            "lr": t.learning_rate * t.expert_lr_scale.get(labels[component], 1.0),
            "component": component,
        }
        for component, expert in model.experts.items()
    ]


def activate(
    model: torch.nn.Module, optimizer: Any, scheduler: Any, denoiser: Denoiser, offload: bool, device: torch.device
) -> None:
    """Only the step's denoiser learns: the other experts' learning rate is 0 for the step (the scheduler restores
    it), so no optimizer moves their weights (DeepSpeed's would, on its zero gradients); with `offload`, only the
    step's expert is on the device."""
    if len(optimizer.param_groups) == 1:
        return
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr if group["component"] == denoiser.component else 0.0
    if offload:
        for component, expert in unwrapped(model).experts.items():
            expert.to(device if component == denoiser.component else "cpu")


def deepspeed_input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed casts the whole model to bf16/fp16 and does not autocast: inputs must come in that dtype."""
    if accelerator.state.deepspeed_plugin is None or accelerator.mixed_precision not in DTYPES:
        return None
    return DTYPES[accelerator.mixed_precision]


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


def peak_flops(accelerator: Accelerator) -> float | None:
    """bf16 peak of all processes' GPUs together, for MFU; None on the CPU or a GPU not in perf's table."""
    if accelerator.device.type != "cuda":
        return None
    peak = device_peak_flops(torch.cuda.get_device_name(accelerator.device))
    return peak * accelerator.num_processes if peak else None


def step_seed(seed: int, micro: int, rank: int) -> int:
    return ((seed * 1_000_003 + micro) * 4099 + rank) % (2**63)


def warn_skipped(accelerator: Accelerator, window: Window, pos: Position, grad_norm: float, in_row: int) -> None:
    files = f" (cache files on rank {accelerator.process_index}: {', '.join(window.last_bad_files)})"
    what = "loss" if window.last_bad_files else f"gradient (norm {grad_norm})"
    if window.last_bad_files or accelerator.is_main_process:
        tqdm.write(
            f"vidlora: step {pos.step}: non-finite {what}{files if window.last_bad_files else ''}; "
            f"step skipped ({in_row} in a row, {pos.skipped} in total)"
        )


def aborted_message(step: int, in_row: int, good: Path | None, last: Path | None) -> str:
    """Name a checkpoint worth resuming from: one whose weights went on to give a finite step (none is
    written inside a streak, but the last one before it may hold the weights that blew up)."""
    if good:
        where = f"the last good checkpoint is {good} (resume with --resume {good})"
    elif last:
        where = f"no checkpoint is known good: {last}, the last one, went straight into the streak"
    else:
        where = "no checkpoint was written yet"
    return (
        f"{in_row} steps in a row ({step - in_row + 1}-{step}) had a non-finite loss or gradient: stopping; "
        f"{where}. Check the cache files named above, lower train.learning_rate, or raise "
        "train.max_nonfinite_in_row"
    )


def collate_batch(family: ModelFamily, items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate(items)
    batch.update(family.collate_text(batch.pop("text")))
    return batch


def adapter_meta(recipe: Recipe, family: ModelFamily) -> dict[str, Any]:
    """What an exported adapter says about itself in its safetensors header."""
    return {
        "format": "vidlora",
        "family": family.name,
        "base_model": recipe.model.path,
        "kind": recipe.lora.kind,
        "rank": recipe.lora.rank,
        "alpha": recipe.lora.alpha or recipe.lora.rank,
        "target_modules": lora_targets(family, recipe.lora.targets),
        "trigger_words": sorted({d.trigger for d in recipe.data.datasets if d.trigger}),
        "recipe": recipe.to_toml(),
    }


def finish(
    accelerator: Accelerator,
    model: torch.nn.Module,
    family: ModelFamily,
    recipe: Recipe,
    run: Path,
    meta: dict,
    steps: int,
    ema: LoraEMA | None = None,
) -> list[tuple[str, Path]]:
    """Write the final adapters (one per trained denoiser): canonical, diffusers (`pytorch_lora_weights.safetensors`,
    the name `load_lora_weights` looks for in a folder; `_high_noise` / `_low_noise` before the extension for
    experts) and every other format of `export.formats`. Returns (format, file) of each on the main process."""
    accelerator.wait_for_everyone()
    if ema is not None and recipe.export.use_ema:  # the EMA is the adapter; the raw weights are in the checkpoint
        meta = {**meta, "ema_decay": ema.decay}
        with ema.applied():
            loras = gather_lora(accelerator, model)
    else:
        loras = gather_lora(accelerator, model)  # every rank: ZeRO-3 gathers
    written: list[tuple[str, Path]] = []
    if accelerator.is_main_process:
        from trainer.export import export_adapter, export_files

        experts, adapters = unwrapped(model).experts, []
        for denoiser in family.trained_denoisers():
            path = run / adapter_name(denoiser)
            expert_meta = {**meta, **denoiser_meta(denoiser), "steps": steps}
            save_adapter(path, experts[denoiser.component], expert_meta, loras[denoiser.component])
            adapters.append(path)
            out = run / "pytorch_lora_weights.safetensors"  # export adds the expert: ..._high_noise.safetensors
            written.append(("vidlora", path))
            if "diffusers" in recipe.export.formats or recipe.lora.kind in ("lora", "dora"):
                written.append(("diffusers", export_adapter(path, out, "diffusers", recipe.export.dtype)))
        others = [f for f in recipe.export.formats if f != "diffusers"]
        for w in export_files(adapters, others, out_dir=run, dtype=recipe.export.dtype) if others else []:
            written.append((w.fmt, w.path))
        from trainer.card import write_card

        written.append(("card", write_card(run)))
    accelerator.end_training()
    return written
