"""Run folder layout, atomic checkpoints and the adapter file every checkpoint carries.

    RUN/recipe.toml               the resolved recipe
    RUN/env.json                  `vidlora env --json` of the machine, written at every start
    RUN/.lock                     held by the training process (one trainer per folder)
    RUN/metrics.jsonl             one line per logged step (cut back to the checkpoint step on resume)
    RUN/checkpoints/step-000250/  accelerate state: LoRA weights only, optimizer, RNG of every rank
                                  (under DeepSpeed: its own files, frozen base excluded)
                                  + adapter.safetensors (canonical peft keys, alphas and training metadata)
                                  + trainer_state.json (position in the data, LR scheduler, world size)
    RUN/checkpoints/latest        name of the newest complete checkpoint
    RUN/validation/step-000250/   validation videos
    RUN/adapter.safetensors       the final adapter
    RUN/pytorch_lora_weights.safetensors   the final adapter in diffusers format

A family with two experts has one adapter each, named with the expert: adapter_high_noise.safetensors,
adapter_low_noise.safetensors (and pytorch_lora_weights_high_noise.safetensors ...).

A checkpoint is written into a temp folder by every rank, fsynced and renamed by the main process, and
`latest` moves only after that: a kill at any moment leaves the previous checkpoint usable. Old ones are
pruned only afterwards. Our own state is JSON, so resuming never unpickles it; accelerate loads its files
with `weights_only=True` (DeepSpeed's own checkpoint files are read by DeepSpeed).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from data.cache import atomic_write, file_mode, write_json
from trainer.config import Recipe, UserError
from trainer.env import collect
from trainer.formats import alphas_from_model, comfyui_dora_scales, load_lora, save_lora

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.models.base import Denoiser

log = logging.getLogger("vidlora.checkpoint")

ADAPTER = "adapter.safetensors"
STATE = "trainer_state.json"
# Fault injection for the crash tests only: SIGKILL this process inside save_checkpoint at that step,
# after the checkpoint is written and before it is renamed into place.
KILL_IN_CHECKPOINT = "VIDLORA_TEST_KILL_IN_CHECKPOINT"


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical peft keys (`blocks.0.attn1.to_q.lora_A.weight`), cloned to fp32 on the CPU; DoRA modules also get
    ComfyUI's `dora_scale`, which depends on the base weights (trainer/formats.py: comfyui_dora_scales)."""
    state = {k: full(v).detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {**state, **comfyui_dora_scales(model)}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor: an all-gather, so every rank must call this), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_zero3(accelerator: Any) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def is_fsdp(accelerator: Any) -> bool:
    return getattr(accelerator.state, "fsdp_plugin", None) is not None


def adapter_name(denoiser: Denoiser) -> str:
    """adapter.safetensors, or adapter_high_noise.safetensors for an expert."""
    return f"adapter{denoiser.suffix}.safetensors"


def denoiser_meta(denoiser: Denoiser) -> dict[str, Any]:
    """What an adapter says about the transformer it is for (two-expert families only)."""
    if not denoiser.label:
        return {}
    return {"expert": denoiser.label, "component": denoiser.component, "sigma_range": list(denoiser.sigmas)}


def gather_lora(accelerator: Any, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]] | None:
    """{component: its LoRA tensors} on the main process (None on the others). Every rank must call this: under
    ZeRO-3 parameters are sharded, and get_peft_model_state_dict silently returns empty tensors unless they are
    gathered on all ranks first; FSDP2's are DTensor shards, which every rank all-gathers (`full`)."""
    experts = accelerator.unwrap_model(model).experts

    def collect() -> dict[str, dict[str, torch.Tensor]] | None:
        if not accelerator.is_main_process:
            return None
        return {component: lora_state_dict(expert) for component, expert in experts.items()}

    if is_fsdp(accelerator):
        loras = {component: lora_state_dict(expert) for component, expert in experts.items()}
        return loras if accelerator.is_main_process else None
    if is_zero3(accelerator):
        import deepspeed

        params = [p for p in experts.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return collect()
    return collect()


def save_adapter(
    path: Path, model: torch.nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> None:
    """The canonical adapter file; `state` defaults to the model's LoRA (pass a gathered one under ZeRO-3)."""
    save_lora(
        path, state if state is not None else lora_state_dict(model), {**meta, "alphas": alphas_from_model(model)}
    )


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(canonical LoRA, metadata with JSON values decoded) of an adapter file."""
    sd, raw = load_lora(path)
    return sd, decode_meta(raw)


def decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    """A safetensors header with its JSON values decoded (other strings kept)."""
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def find_adapters(src: str | Path) -> list[Path]:
    """The adapter files of a file, a checkpoint folder, or a run folder (final adapters, else the latest
    checkpoint's): one, or one per expert."""
    src = Path(src)
    if src.is_file():
        return [src]
    for folder in (src, latest_checkpoint(src / "checkpoints")):
        found = sorted(folder.glob("adapter*.safetensors")) if folder is not None else []
        if found:
            return found
    raise FileNotFoundError(f"{src}: no {ADAPTER} here, in a checkpoint, or in a run's checkpoints/")


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints (a `step-N` folder exists only once fully written), oldest first."""
    return sorted((p for p in Path(folder).glob("step-*") if (p / STATE).is_file()), key=checkpoint_step)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete; else the newest complete one; else None."""
    folder = Path(folder)
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if (named / STATE).is_file():
            return named
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def save_checkpoint(
    accelerator: Any,
    folder: Path,
    step: int,
    model: torch.nn.Module,
    meta: dict,
    keep: int,
    state: dict,
    ema: Any = None,
) -> Path:
    """Save accelerate (or DeepSpeed) state + adapter + `state` (JSON) + the EMA (if any) as `folder/step-N`, atomically.
    Every rank must call this (each writes its own RNG state or optimizer shard)."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)
    else:
        accelerator.save_state(str(tmp))  # LoRA-only through the hooks trainer.train registers
    loras = gather_lora(accelerator, model)
    accelerator.wait_for_everyone()  # every rank's files are written before the main process renames
    if accelerator.is_main_process:
        denoisers = accelerator.unwrap_model(model)
        for denoiser in denoisers.family.trained_denoisers():
            expert, lora = denoisers.experts[denoiser.component], loras[denoiser.component]
            save_adapter(tmp / adapter_name(denoiser), expert, {**meta, **denoiser_meta(denoiser), "steps": step}, lora)
        if ema is not None:  # trainer/ema.py: the EMA of the LoRA weights
            from trainer.ema import EMA_FILE

            ema.save(tmp / EMA_FILE)
        (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if os.environ.get(KILL_IN_CHECKPOINT) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        old = folder / f".old-step-{step:06d}"
        if final.exists():  # re-saving a step (after resuming from an earlier one): keep it until replaced
            os.replace(final, old)
        os.replace(tmp, final)
        atomic_write(folder / "latest", lambda p: Path(p).write_text(final.name))
        shutil.rmtree(old, ignore_errors=True)
        for stale in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
        tqdm.write(f"checkpoint: {final}")
    accelerator.wait_for_everyone()
    return final


def remove_partial(folder: Path) -> None:
    """Temp folders a killed save left behind (never a complete checkpoint)."""
    for tmp in [*folder.glob(".tmp-step-*"), *folder.glob(".old-step-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def set_aside_newer(folder: Path, step: int) -> list[Path]:
    """Resuming from an earlier checkpoint starts a new timeline: checkpoints after `step` move to
    `folder/abandoned/` (kept, never loaded or pruned) so `latest` and pruning only see this one."""
    moved = []
    for ckpt in complete_checkpoints(folder):
        if checkpoint_step(ckpt) > step:
            target = folder / "abandoned" / ckpt.name
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(ckpt, target)
            moved.append(target)
    return moved


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder; files get the mode open() gives (accelerate's safetensors are 0600)."""
    mode = file_mode()
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            os.chmod(path, mode)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))


def load_scheduler(scheduler: Any, state: dict, learning_rate: float) -> None:
    """Restore the LR schedule's position. Its saved base learning rate would silently win over the
    recipe's, so a lowered train.learning_rate (say after a non-finite streak) would do nothing: the
    recipe's applies from the first resumed step."""
    scheduler.load_state_dict(state)
    if all(lr == learning_rate for lr in scheduler.base_lrs):
        return
    log.warning("resuming with train.learning_rate %g (the checkpoint had %g)", learning_rate, scheduler.base_lrs[0])
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = learning_rate, learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def run_shape(recipe: Recipe, world: int, deepspeed: bool, fsdp: bool = False) -> dict[str, Any]:
    """What a checkpoint's data position and optimizer shards depend on."""
    t = recipe.train
    return {
        "world_size": world,
        "batch_size": t.batch_size,
        "gradient_accumulation": t.gradient_accumulation,
        "seed": t.seed,
        "context_parallel": t.context_parallel,
        "deepspeed": deepspeed,
        "fsdp": fsdp,
    }


def check_resumable(state: dict, recipe: Recipe, world: int, deepspeed: bool, fsdp: bool = False) -> None:
    saved = {k: state.get(k) for k in run_shape(recipe, world, deepspeed, fsdp)}
    now = run_shape(recipe, world, deepspeed, fsdp)
    if bool(saved["fsdp"]) != fsdp:  # its model and optimizer are torch.distributed.checkpoint shards, or are not
        raise UserError(f"checkpoint was saved {'with' if saved['fsdp'] else 'without'} FSDP; resume it the same way")
    if saved["deepspeed"] != deepspeed or (deepspeed and saved["world_size"] != world):
        raise UserError(
            f"checkpoint was saved with deepspeed={saved['deepspeed']} on {saved['world_size']} processes; "
            f"resume it the same way (now: deepspeed={deepspeed}, {world} processes)"
        )
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if saved[k] is not None and saved[k] != now[k]]
    if changed:
        log.warning("resuming with %s: the run continues, but not as the uninterrupted run would", ", ".join(changed))


def finished(run: Path, max_steps: int, main: bool) -> bool:
    """Whether the run already trained `max_steps` steps and wrote its final files: then `--resume` has nothing to
    do, and says so (`main`: the process that does). The model card is the last file `train.finish` writes (runs
    from before it had a card end with the diffusers file, which LoKr/LoHa runs do not write)."""
    adapters = sorted(run.glob("adapter*.safetensors"))  # one, or one per expert
    if not adapters or not ((run / "README.md").exists() or list(run.glob("pytorch_lora_weights*.safetensors"))):
        return False
    steps = min(int(read_adapter(a)[1].get("steps") or 0) for a in adapters)
    if steps < max_steps:
        return False
    if main:
        print(
            f"vidlora: {run} already finished at step {steps} (train.max_steps = {max_steps}): nothing to train; "
            "raise train.max_steps (--set train.max_steps=N) to train further",
            flush=True,
        )
    return True


def find_resume_checkpoint(run: Path, resume: str | None, main: bool = True) -> Path | None:
    """The checkpoint to resume from: `resume` is a folder or 'latest'. With 'latest' and no complete
    checkpoint (a kill before or inside the first save), the run starts fresh: a requeued job that always
    passes --resume must not fail forever. `main`: the process that says so."""
    checkpoints = run / "checkpoints"
    if not resume:
        done = complete_checkpoints(checkpoints)
        if done:
            raise UserError(
                f"{checkpoints} already holds {done[-1].name}: resume with --resume, or choose another train.output_dir"
            )
        return None
    if resume != "latest":
        if not (Path(resume) / STATE).is_file():
            raise FileNotFoundError(f"{resume}: not a complete vidlora checkpoint (no {STATE})")
        return Path(resume)
    checkpoint = latest_checkpoint(checkpoints)
    if checkpoint is None and main:
        partial = " (a partial one from a killed save is removed)" if any(checkpoints.glob(".tmp-step-*")) else ""
        log.warning("--resume: no complete checkpoint in %s%s: starting from step 0", checkpoints, partial)
    return checkpoint


def lock_run_folder(run: Path) -> IO[str]:
    """Hold RUN/.lock while training: a second trainer on the same folder (a job submitted twice, ranks of
    an earlier launch still running) would interleave checkpoints and metrics. A POSIX lock: it goes with
    the process (even on SIGKILL), forked DataLoader workers do not hold it, and it works over NFS.
    Filesystems that cannot lock are not locked."""
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 (kept open: it holds the lock)
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return f
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UserError(
            f"{run}: {owner} is training into this folder; wait for it to end or choose another train.output_dir"
        ) from None
    f.truncate(0)
    f.write(f"vidlora train (pid {os.getpid()} on {socket.gethostname()})")
    f.flush()
    return f


def start_run_folder(run: Path, recipe: Recipe, checkpoint: Path | None, step: int) -> None:
    """Write the recipe and the environment (`vidlora env`, for `vidlora report`); on resume, drop what happened after
    the checkpoint (metrics, newer checkpoints); on a fresh start, what an earlier attempt in this folder logged (its
    metrics and wandb run)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
    write_json(run / "env.json", collect(check_ops=False))
    remove_partial(run / "checkpoints")
    metrics = run / "metrics.jsonl"
    if checkpoint is None:
        metrics.unlink(missing_ok=True)
        (run / "wandb_id").unlink(missing_ok=True)
        return
    for moved in set_aside_newer(run / "checkpoints", step):
        log.warning("resuming from step %d: newer checkpoint moved to %s", step, moved)
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        atomic_write(metrics, lambda p: Path(p).write_text(text, encoding="utf-8"))


def register_lora_only_state(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """accelerate's save_state writes the whole model; keep only the trainable (LoRA) tensors. Under FSDP it saves
    and loads the model's own state dict (torch.distributed.checkpoint shards): that is cut to the LoRA instead,
    and the frozen base is not missing when it loads."""
    if is_fsdp(accelerator):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}

        def drop_frozen(module: Any, state: dict, prefix: str, local_metadata: Any) -> None:
            for key in [k for k in state if k.removeprefix(prefix) not in keep]:
                del state[key]

        def frozen_not_missing(module: Any, incompatible: Any) -> None:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k in keep]

        model._register_state_dict_hook(drop_frozen)
        model.register_load_state_dict_post_hook(frozen_not_missing)
        return

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
