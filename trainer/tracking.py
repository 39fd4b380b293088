"""What a run reports, in one place: the console line, metrics.jsonl and wandb get the same numbers.

wandb runs offline unless an API key or a login exists; a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from trainer.config import Recipe

if TYPE_CHECKING:
    from data.dataset import BucketBatchSampler, CachedDataset
    from trainer.train import Position

FORMATS = {
    "loss": ".5f",
    "loss_reg": ".5f",
    "val_loss": ".5f",
    "lr": ".3e",
    "grad_norm": ".4f",
    "step_time": ".3f",
    "samples_per_s": ".2f",
    "tflops": ".3f",
    "mfu": ".3f",
    "memory_gb": ".2f",
    "skipped_steps": "d",
    "epoch": "d",
}


class Window:
    """Loss, samples and time since the last log; the per-step flags every rank must agree on."""

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops  # all processes together; None: no MFU (CPU, or a GPU not in the table)
        self.start = time.perf_counter()
        self.loss_sum = self.loss_n = self.samples = self.steps = self.flops = 0.0
        self.local_bad: list[str] = []  # this step's cache files whose loss was non-finite (this rank)
        self.step_bad = self.step_loss = self.step_n = self.step_samples = self.step_flops = 0.0
        self.step_expert = ""  # the expert this step trains ("" with one transformer)
        self.expert_loss: dict[str, list[float]] = {}  # expert -> [loss sum, count] since the last log
        self.step_reg = [0.0, 0.0]  # this step's regularisation samples: [loss sum, count] (this rank)
        self.reg = [0.0, 0.0]  # since the last log, all ranks

    def add(
        self,
        loss: float,
        n: int,
        files: list[str],
        flops: float = 0.0,
        expert: str = "",
        reg: tuple[float, int] = (0.0, 0),
    ) -> None:
        """One micro-batch: its loss, samples, cache files, model FLOPs (trainer.perf's count), expert, and the
        (loss sum, count) of its regularisation samples."""
        self.step_expert = expert
        self.step_flops += flops
        if math.isfinite(loss):
            self.step_loss += loss
            self.step_n += 1
            self.step_reg = [self.step_reg[0] + reg[0], self.step_reg[1] + reg[1]]
        else:
            self.step_bad += 1
            self.local_bad += files
        self.step_samples += n

    def end_step(self, accelerator: Accelerator, stop: bool) -> tuple[bool, bool]:
        """Reduce this step's numbers over ranks; returns (some loss was non-finite, stop requested)."""
        local = [self.step_bad, float(stop), self.step_loss, self.step_n, self.step_samples, self.step_flops]
        local += self.step_reg
        total = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum")
        bad, stop_any, loss, n, samples, flops, reg_loss, reg_n = total.tolist()
        self.last_bad_files, self.local_bad = self.local_bad, []
        self.step_bad = self.step_loss = self.step_n = self.step_samples = self.step_flops = 0.0
        self.step_reg = [0.0, 0.0]
        self.flops += flops
        if not bad:
            self.loss_sum += loss
            self.loss_n += n
            self.reg = [self.reg[0] + reg_loss, self.reg[1] + reg_n]
            if self.step_expert:
                acc = self.expert_loss.setdefault(self.step_expert, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + loss, acc[1] + n
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
            "tflops": self.flops / elapsed / 1e12,  # model FLOPs of a LoRA step (docs/performance.md), all ranks
            "memory_gb": memory_gb(),
            "skipped_steps": pos.skipped,
            "epoch": pos.epoch,
        }
        if self.peak_flops:
            logs["mfu"] = self.flops / elapsed / self.peak_flops
        if self.reg[1]:
            logs["loss_reg"] = self.reg[0] / self.reg[1]  # the regularisation samples' mean loss
        self.reg = [0.0, 0.0]
        for expert, (total, n) in sorted(self.expert_loss.items()):
            logs[f"loss_{expert}"] = total / n
        logs |= {f"steps_{expert}": count for expert, count in sorted(pos.experts.items())}
        self.expert_loss = {}
        self.start, self.loss_sum, self.loss_n, self.samples, self.steps, self.flops = now, 0.0, 0.0, 0.0, 0.0, 0.0
        return logs


def engine(accelerator: Accelerator) -> str:
    """What really runs (launch flags and environment variables can silently change it)."""
    n = accelerator.num_processes
    plugin = accelerator.state.deepspeed_plugin
    name = f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin else ("DDP" if n > 1 else "single process")
    if fsdp := getattr(accelerator.state, "fsdp_plugin", None):
        name = f"FSDP{fsdp.fsdp_version}"
    over = f" over {accelerator.state.backend}" if n > 1 and accelerator.state.backend else ""
    procs = f", {n} processes" if n > 1 else ""
    return f"{name}{over}{procs} on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}"


def report_start(
    accelerator: Accelerator,
    recipe: Recipe,
    dataset: CachedDataset,
    sampler: BucketBatchSampler,
    params: list[torch.Tensor],
    checkpoint: Path | None,
    step: int,
) -> None:
    """Before step 1: what trains on what, in which batches, and where it starts from."""
    if not accelerator.is_main_process:
        return
    t, lora, v = recipe.train, recipe.lora, recipe.validation
    shapes = Counter(dataset.shape_key(i) for i in range(len(dataset)))
    buckets = ", ".join(f"{w}x{h}x{f} frames: {n}" for (w, h, f), n in sorted(shapes.items()))
    held = len({s["source"] for s in dataset.heldout})
    world, accum = accelerator.num_processes, t.gradient_accumulation
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 partitions: ds_numel is whole
    lines = [
        f"  data      {len(dataset)} samples in {len(shapes)} bucket(s) ({buckets})"
        + (f"; {held} clip(s) held out for val_loss ({len(dataset.heldout)} samples)" if held else ""),
        f"  batch     {t.batch_size} per process x {world} process(es) x {accum} accumulation = "
        f"{t.batch_size * world * accum} samples/step; an epoch is {len(sampler)} batches",
        f"  lora      rank {lora.rank}, alpha {lora.alpha or lora.rank:g} on {len(params) // 2} modules"
        + (f" ({lora.targets})" if isinstance(lora.targets, str) and len(lora.targets) <= 40 else "")
        + f": {trainable:,} trainable parameters (fp32)",
    ]
    if dataset.regularisation:
        regular = Counter(e["dataset"] for e in dataset.entries if e["dataset"] in dataset.regularisation)
        shares = ", ".join(
            f"{name}: {regular[name]} samples, {share:g} of each batch"
            for name, share in sorted(dataset.regularisation.items())
        )
        lines.append(f"  reg       {shares}; logged as loss_reg")
    if lora.init_from:
        lines.append(f"  init      weights, rank, alpha and targets from lora.init_from {lora.init_from}")
    where = f"resumed from {checkpoint}" if checkpoint else "from scratch"
    plan = f"  steps     {step + 1} to {t.max_steps} ({where}); checkpoint every {t.checkpoint_every}"
    lines.append(plan + (f", validation every {v.every}" if v.every else ""))
    print("\n".join(lines), flush=True)


def report_end(
    accelerator: Accelerator, run: Path, pos: Position, started: float, written: list[tuple[str, Path]]
) -> None:
    """The closing summary: how far, how long, the losses, and where every file went."""
    if not accelerator.is_main_process:
        return
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    lines = [f"done: step {pos.step} in {minutes}m{seconds:02d}s, {pos.skipped} skipped"]
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = [r for r in rows if r.get("loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    if train:
        lines.append(f"  loss          {train[-1]['loss']:.5f} (last logged, step {train[-1]['step']})")
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        lines.append(
            f"  val_loss      best {best['val_loss']:.5f} (step {best['step']}), "
            f"last {val[-1]['val_loss']:.5f} (step {val[-1]['step']})"
        )
    lines += [f"  {fmt:13s} {path}" for fmt, path in written]
    checkpoints = run / "checkpoints"
    if (checkpoints / "latest").is_file():
        lines.append(f"  checkpoints   {checkpoints} (latest: {(checkpoints / 'latest').read_text().strip()})")
    lines.append(f"  metrics       {metrics} (`vidlora plot {run}` draws it)")
    videos = sorted((run / "validation").rglob("*.mp4"))
    if videos:
        lines.append(f"  validation    {run / 'validation'} ({len(videos)} videos)")
    for offline in sorted((run / "wandb").glob("offline-run-*")):
        lines.append(f"  wandb         {offline} (offline: `wandb sync {offline}` uploads it)")
    tqdm.write("\n".join(lines))


def memory_gb() -> float:
    """Peak GPU memory allocated since the last log (CUDA), else this process's resident memory."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


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
    for key, value in logs.items():  # per expert: loss_high_noise, val_loss_low_noise, steps_high_noise ...
        if key not in FORMATS and key.startswith(("loss_", "val_loss_", "steps_")):
            parts.append(f"{key} {value:{'d' if key.startswith('steps_') else '.5f'}}")
    return "  ".join(parts)


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
