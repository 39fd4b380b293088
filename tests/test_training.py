"""Training guard rails, memory modes, validation, tracking, `vidlora env` and `vidlora plot`, on the tiny
Wan model and real cached clips; plus unit tests of the sharded sampler and the DeepSpeed config rules."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan
from PIL import Image
from transformers import UMT5EncoderModel

from data.cache import load_entry, read_meta, save_entry
from data.dataset import BucketBatchSampler, CachedDataset, holdout_sources
from data.media import probe
from tests.conftest import ROOT, run_cli, train_capturing, write_recipe
from tests.training_setup import copy_cache, losses, recipe_text, train_run
from trainer.checkpoint import latest_checkpoint, lock_run_folder, read_adapter
from trainer.config import UserError, load_recipe
from trainer.memory import parameter_bytes
from trainer.tracking import FORMATS
from trainer.train import configure_deepspeed


def corrupt(entry: Path) -> None:
    """Write a NaN into a cache entry's latents, as a bad disk or a broken VAE pass would."""
    tensors, meta = load_entry(entry), read_meta(entry)
    tensors["latents"][0, 0, 0, 0] = float("nan")
    save_entry(entry, tensors, meta)


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "samples").rglob("*.safetensors"))


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# --- guard rails -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_in_a_cached_sample_skips_its_steps(prepared, tmp_path):
    model, cache = prepared
    cache = copy_cache(cache, tmp_path / "cache")
    bad = entries(cache)[0]
    corrupt(bad)
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(model, cache, tmp_path / "run", 8, checkpoint_every=1))
    proc = train_run(recipe)
    assert "vidlora train: single process on cpu, mixed precision no" in proc.stdout.splitlines()[0]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [
        r["step"] for r, prev in zip(rows, [{"skipped_steps": 0}, *rows]) if r["skipped_steps"] > prev["skipped_steps"]
    ]
    assert len(skipped) == 2  # the bad sample comes once per epoch of 4 batches
    assert rows[-1]["skipped_steps"] == 2
    assert all(rows[s - 1]["loss"] is None for s in skipped)  # a skipped step has no finite loss to log
    out = proc.stdout + proc.stderr
    assert f"step {skipped[0]}: non-finite loss" in out and bad.relative_to(cache).as_posix() in out

    def adapter(step):
        return read_adapter(run / f"checkpoints/step-{step:06d}/adapter.safetensors")[0]

    for step in range(1, 9):  # checkpoint_every = 1, but never a state inside a non-finite streak
        assert (run / f"checkpoints/step-{step:06d}").is_dir() == (step not in skipped), step
    for step in range(2, 9):
        if step not in skipped and step - 1 not in skipped:  # a finite step updates the LoRA
            before, after = adapter(step - 1), adapter(step)
            assert not all(torch.equal(before[k], after[k]) for k in before), step
    # a skipped step leaves the LoRA as it was: the same run stopped right after it ends with the weights
    # of the step before
    step = next(s for s in skipped if s > 1 and s - 1 not in skipped)
    short = tmp_path / "short"
    train_run(recipe, "one", "--set", f"train.max_steps={step}", "--set", f"train.output_dir={short}")
    final, before = read_adapter(short / "adapter.safetensors")[0], adapter(step - 1)
    assert all(torch.equal(final[k], before[k]) for k in before)
    final = read_adapter(run / "adapter.safetensors")[0]
    assert all(torch.isfinite(v).all() for v in final.values())


def error_line(stderr: str) -> str:
    """The `vidlora: error:` line, which must start a line of its own (not follow the progress bar)."""
    lines = [line for line in stderr.split("\n") if "vidlora: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("vidlora: error: "), lines
    return lines[0]


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_abort_with_the_checkpoint_intact(prepared, tmp_path):
    model, cache = prepared
    cache = copy_cache(cache, tmp_path / "cache")
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(model, cache, tmp_path / "run", 4))
    train_run(recipe)
    checkpoints = tmp_path / "run/checkpoints"
    before = tree_hash(checkpoints)
    for entry in entries(cache):
        corrupt(entry)
    proc = train_run(
        recipe, "one", "--resume", "--set", "train.max_steps=20", "--set", "train.max_nonfinite_in_row=3", check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line.startswith("vidlora: error: 3 steps in a row (5-7) had a non-finite loss or gradient")
    assert f"no checkpoint is known good: {checkpoints / 'step-000004'}, the last one, went straight" in line
    assert "Traceback" not in proc.stderr
    assert tree_hash(checkpoints) == before
    assert latest_checkpoint(checkpoints).name == "step-000004"


@pytest.mark.slow
def test_a_nonfinite_streak_names_a_good_checkpoint_that_resumes_cleanly(prepared, tmp_path):
    """A learning rate that blows the LoRA up (|w| ~ 1e30 after one step, then inf): the following steps
    are skipped, no checkpoint is written inside the streak, and the abort names the last checkpoint whose
    weights still gave a finite step, not the one holding the blown-up weights. Resumed from it with the
    recipe's learning rate, the run finishes cleanly."""
    model, cache = prepared
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(model, cache, tmp_path / "run", 4, checkpoint_every=2))
    train_run(recipe)
    checkpoints = tmp_path / "run/checkpoints"
    before = tree_hash(checkpoints)
    blow_up = [
        "--set",
        "train.learning_rate=1e30",
        "--set",
        "train.max_nonfinite_in_row=3",
        "--set",
        "train.max_steps=20",
    ]
    proc = train_run(recipe, "one", "--resume", *blow_up, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resuming with train.learning_rate 1e+30" in proc.stderr  # the recipe's rate wins over the saved one
    named = checkpoints / "step-000004"  # its weights gave the finite step 5, whose update blew them up
    line = error_line(proc.stderr)
    assert line.startswith("vidlora: error: 3 steps in a row (6-8)") and f"last good checkpoint is {named} " in line
    assert tree_hash(checkpoints) == before  # nothing written during the streak (step 6 and 8 were due)

    train_run(recipe, "one", "--resume", str(named), "--set", "train.max_steps=8")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["loss"] is not None and r["skipped_steps"] == 0 for r in rows)
    final = read_adapter(tmp_path / "run/adapter.safetensors")[0]
    assert max(v.abs().max().item() for v in final.values()) < 1.0


@pytest.mark.slow
def test_a_second_trainer_on_a_run_folder_in_use_stops(prepared, tmp_path):
    """One trainer per run folder: a job submitted twice, or ranks of an earlier launch still running,
    would interleave checkpoints and metrics. Here this test's process holds the folder."""
    model, cache = prepared
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(model, cache, tmp_path / "run", 2))
    lock = lock_run_folder(tmp_path / "run")
    try:
        proc = train_run(recipe, check=False)
    finally:
        lock.close()
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert f"{tmp_path / 'run'}: vidlora train (pid {os.getpid()} on " in line and "is training into" in line
    assert not (tmp_path / "run/recipe.toml").exists()


# --- memory modes -----------------------------------------------------------------------------------


def in_process_run(recipe_path: Path, monkeypatch, keep: dict) -> Path:
    """Train in this process (the real loop) and keep the trained transformer for inspection."""
    run, keep["model"] = train_capturing(recipe_path)
    return run


@pytest.mark.slow
def test_memory_modes_train(prepared, tmp_path, monkeypatch):
    model, cache = prepared

    def run(name, validation="", **modes):
        text = recipe_text(model, cache, tmp_path / name, 4, **modes) + validation
        keep = {}
        return in_process_run(write_recipe(tmp_path / f"{name}.toml", text), monkeypatch, keep), keep["model"]

    plain, plain_model = run("plain")
    # block offload on the CPU is a device no-op, but every layer goes through the offload hooks: the
    # LoRA stays out of them and trains, and the numbers are the same as without offloading
    offload, offload_model = run("offload", block_offload=True)
    assert losses(offload) == losses(plain)
    assert offload_model.is_gradient_checkpointing
    assert any(hasattr(m, "_diffusers_hook") for n, m in offload_model.named_modules() if n.endswith("base_layer"))
    assert not any(hasattr(m, "_diffusers_hook") for n, m in offload_model.named_modules() if "lora_" in n)

    # with validation videos every 2 steps: the pipeline runs around the fp8 transformer, the text
    # encoder is never loaded (cached prompt embeddings), the VAE once, for decoding
    def no_text_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was loaded during training")

    vae_loads = []
    real_vae = AutoencoderKLWan.from_pretrained.__func__
    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", no_text_encoder)
    monkeypatch.setattr(
        AutoencoderKLWan,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: vae_loads.append(1) or real_vae(cls, *a, **k)),
    )
    validation = "[validation]\nevery = 2\ninference_steps = 2\nnum_frames = 5\n"
    low, low_model = run("low", validation, fp8_base=True, optimizer="adamw8bit", gradient_checkpointing=True)
    assert len(vae_loads) == 1 and len(list((low / "validation").rglob("*.mp4"))) == 2
    frozen = [p for p in low_model.parameters() if not p.requires_grad]
    assert any(p.dtype == torch.float8_e4m3fn for p in frozen)
    assert all(p.dtype == torch.float32 for p in low_model.parameters() if p.requires_grad)
    assert parameter_bytes(low_model)["frozen"] < 0.7 * parameter_bytes(plain_model)["frozen"]
    got, want = losses(low), losses(plain)
    assert all(math.isclose(got[s], want[s], rel_tol=2e-2) for s in want)  # fp8 rounding of the base
    trained = read_adapter(low / "adapter.safetensors")[0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    # accelerate keeps one precision per process and refuses another: a bf16 recipe after these fp32 ones (a notebook,
    # a sweep) still trains, in bf16
    bf16, bf16_model = run("bf16", mixed_precision="bf16")
    assert len(losses(bf16)) == 4 and all(math.isfinite(v) for v in losses(bf16).values())
    assert losses(bf16) != losses(plain)


# --- validation and tracking ----------------------------------------------------------------------


@pytest.mark.slow
def test_validation_videos_and_held_out_loss(validated_run, prepared, tmp_path):
    recipe, run, _ = validated_run
    for step in (0, 3, 6):
        videos = list((run / f"validation/step-{step:06d}").glob("*.mp4"))
        assert [v.name for v in videos] == ["00-a_yellow_star_spins_slowly.mp4"]
        info = probe(videos[0])
        assert (info.num_frames, info.width, info.height) == (5, 64, 64)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 3, 6] and all(math.isfinite(v) for v in val.values())

    # the held-out clip is not trained on
    held = holdout_sources(json.loads((prepared[1] / "index.json").read_text())["samples"], 1)
    dataset = CachedDataset(prepared[1], holdout_clips=1)
    assert len(held) == 1 and not {e["source"] for e in dataset.entries} & held
    assert {e["source"] for e in dataset.heldout} == held

    # fixed sigmas and noise: another run (other training seed) that starts from this run's final adapter
    # measures the same loss for the same weights; its first lines say what it imported
    text = recipe.read_text().replace(str(run), str(tmp_path / "other")).replace("max_steps = 6", "max_steps = 1")
    text = text.replace('project = "vidlora-test"', "wandb = false")
    other = write_recipe(tmp_path / "other.toml", text)
    init = ["--set", f"lora.init_from={run / 'adapter.safetensors'}"]
    proc = train_run(other, "one", "--set", "train.seed=7", "--set", "validation.videos=false", *init)
    first = json.loads((tmp_path / "other/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(val[6], rel=1e-6)
    sigmas = load_recipe(recipe).validation.loss_sigmas  # and per noise level, each measured at every sigma
    assert {f"val_loss_sigma_{s:g}" for s in sigmas} <= set(first)
    assert f"  init      weights, rank, alpha and targets from lora.init_from {run / 'adapter.safetensors'}" in (
        proc.stdout.splitlines()
    )


@pytest.mark.slow
def test_console_metrics_file_and_wandb_agree(validated_run):
    _, run, proc = validated_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert {"loss", "lr", "grad_norm", "step_time", "samples_per_s", "tflops", "memory_gb"} <= set(r)
        assert r["tflops"] > 0 and "mfu" not in r  # MFU needs a GPU with a known peak
        line = next(
            x for x in proc.stdout.splitlines() + proc.stderr.splitlines() if x.startswith(f"step {r['step']}/6")
        )
        for key, fmt in FORMATS.items():
            if key in r:
                assert f"{key} {r[key]:{fmt}}" in line, (key, line)
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    assert b"vidlora-test" in next(wandb_runs[0].glob("*.wandb")).read_bytes()  # project name from the recipe
    assert len(list(wandb_runs[0].rglob("media/videos/**/*.mp4"))) == 3


@pytest.mark.slow
def test_a_run_says_what_it_trains_each_checkpoint_and_where_everything_went(validated_run, prepared):
    recipe, run, proc = validated_run
    out = proc.stdout.splitlines()
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # DeepSpeed's noise is silenced
    # before step 1: data, batch, LoRA, plan (the figures from the cache and the recipe)
    dataset = CachedDataset(prepared[1], holdout_clips=1)
    shapes = {dataset.shape_key(i) for i in range(len(dataset))}
    assert len(shapes) == 1
    w, h, f = shapes.pop()
    data = next(x for x in out if x.startswith("  data "))
    assert data == (
        f"  data      {len(dataset)} samples in 1 bucket(s) ({w}x{h}x{f} frames: {len(dataset)}); "
        f"1 clip(s) held out for val_loss ({len(dataset.heldout)} samples)"
    )
    assert "  batch     1 per process x 1 process(es) x 1 accumulation = 1 samples/step" in proc.stdout
    lora = read_adapter(run / "adapter.safetensors")[0]
    assert f"rank 4, alpha 4 on {len(lora) // 2} modules (default): {sum(v.numel() for v in lora.values()):,} " in (
        proc.stdout
    )
    assert "  steps     1 to 6 (from scratch); checkpoint every 4, validation every 3" in out
    assert [x for x in out if x.startswith("checkpoint: ")] == [
        f"checkpoint: {run / 'checkpoints' / name}" for name in ("step-000004", "step-000006")
    ]
    # the closing summary: losses and every file
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"])
    end = out[out.index(next(x for x in out if x.startswith("done: step 6 in "))) :]
    wandb_run = next((run / "wandb").glob("offline-run-*"))
    for line in (
        f"  loss          {[r for r in rows if 'loss' in r][-1]['loss']:.5f} (last logged, step 6)",
        f"  val_loss      best {best['val_loss']:.5f} (step {best['step']}), last {val[-1]['val_loss']:.5f} (step 6)",
        f"  vidlora       {run / 'adapter.safetensors'}",
        f"  diffusers     {run / 'pytorch_lora_weights.safetensors'}",
        f"  checkpoints   {run / 'checkpoints'} (latest: step-000006)",
        f"  metrics       {run / 'metrics.jsonl'} (`vidlora plot {run}` draws it)",
        f"  validation    {run / 'validation'} (3 videos)",
        f"  wandb         {wandb_run} (offline: `wandb sync {wandb_run}` uploads it)",
    ):
        assert line in end, (line, end)


def test_plot_draws_the_loss_curve(validated_run, tmp_path):
    _, run, _ = validated_run
    proc = run_cli("plot", run, "--out", tmp_path / "loss.png")
    assert "plot:" in proc.stdout
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert image.shape[0] > 300 and image.std() > 10  # a real drawing, not an empty canvas
    assert run_cli("plot", tmp_path, check=False).returncode == 2  # no metrics.jsonl: one-line error


def test_env_reports_versions_hardware_and_deepspeed_ops():
    info = json.loads(run_cli("env", "--json").stdout)
    for pkg in ("torch", "diffusers", "peft", "accelerate", "deepspeed", "bitsandbytes", "decord", "av"):
        assert info["packages"][pkg][0].isdigit(), pkg
    assert info["cuda_available"] == torch.cuda.is_available() and isinstance(info["gpus"], list)
    assert {"bf16_supported", "fp8_storage"} <= set(info)
    assert info["deepspeed_ops"]["CPUAdamBuilder"] in ("compatible", "incompatible")
    text = run_cli("env").stdout
    assert "deepspeed" in text and "bf16" in text and "fp8 storage" in text
    assert "Setting accelerator to CPU" not in text + run_cli("env").stderr  # DeepSpeed's import noise


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's bf16")
def test_env_tells_whether_bf16_training_runs_on_this_cpu():
    """The truth is what a bf16 autocast forward and backward of a LoRA-sized layer does here."""
    layer = torch.nn.Linear(16, 16)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(torch.randn(4, 16))
        out.float().pow(2).mean().backward()
        runs = out.dtype == torch.bfloat16 and layer.weight.grad is not None
    except RuntimeError:
        runs = False
    info = json.loads(run_cli("env", "--json").stdout)
    assert info["bf16_supported"] == runs and info["bf16"].startswith("cpu")
    assert f"  bf16          {'yes' if runs else 'no'} (cpu" in run_cli("env").stdout


# --- units ------------------------------------------------------------------------------------------


class FakeDataset:
    def __init__(self, shapes):
        self.shapes = shapes

    def __len__(self):
        return len(self.shapes)

    def shape_key(self, i):
        return self.shapes[i]


def test_sampler_shards_same_shape_global_batches_over_ranks():
    data = FakeDataset([(64, 64, 9)] * 7 + [(32, 64, 9)] * 4)
    one = BucketBatchSampler(data, 4, seed=3)
    ranks = [BucketBatchSampler(data, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        per_rank = [list(r) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(one)
        for global_batch, a, b in zip(one, *per_rank):
            ia, ib = [i for i, _ in a], [i for i, _ in b]
            assert len(ia) == len(ib)  # every rank the same number of samples
            assert len({data.shape_key(i) for i in ia + ib}) == 1  # one shape per step
            assert len(set(ia + ib)) == len(ia + ib)  # ranks never share a sample (tails padded from elsewhere)
            if len(global_batch) == 4:  # N processes x B = one process x N*B
                assert ia + ib == [i for i, _ in global_batch]
            assert {e for _, e in a + b} == {epoch}
    # a short bucket tail is topped up to a multiple of the ranks, from its own bucket
    tails = [b for b in ranks[0].global_batches() if len(b) < 4]
    assert all(len(b) % 2 == 0 for b in tails)
    # the order depends on (seed, epoch) only; a resumed epoch skips what was trained
    ranks[0].set_epoch(1)
    full = list(ranks[0])
    ranks[0].set_epoch(1, skip=2)
    assert list(ranks[0]) == full[2:] and len(ranks[0]) == len(full) - 2
    counts = Counter(i for b in BucketBatchSampler(data, 1, seed=0).global_batches() for i in b)
    assert counts == Counter(range(11))  # one process: every sample once per epoch, nothing padded


def test_deepspeed_config_follows_the_recipe():
    recipe = load_recipe(None, ["train.batch_size=2", "train.gradient_accumulation=4", "train.max_grad_norm=0.5"])
    plugin = SimpleNamespace(deepspeed_config={"gradient_clipping": "auto", "train_batch_size": "auto"})
    configure_deepspeed(plugin, recipe)
    assert plugin.deepspeed_config == {
        "gradient_clipping": 0.5,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
    }
    plugin = SimpleNamespace(deepspeed_config={"gradient_accumulation_steps": 8})
    with pytest.raises(UserError, match='gradient_accumulation_steps = 8 but the recipe says 4.*"auto"'):
        configure_deepspeed(plugin, recipe)


def test_shipped_accelerate_configs():
    folder = ROOT / "recipes/accelerate"
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert set(configs) == {"single_gpu", "multi_gpu", "zero2", "zero3", "fsdp2", "multi_node"}
    assert configs["fsdp2"]["distributed_type"] == "FSDP" and configs["fsdp2"]["fsdp_config"]["fsdp_version"] == 2
    for stage in (2, 3):
        cfg = configs[f"zero{stage}"]
        assert cfg["distributed_type"] == "DEEPSPEED"
        ds = json.loads((ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        # the recipe decides these (DeepSpeed's own values would silently win)
        assert all(
            ds[k] == "auto"
            for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
        )
    assert configs["multi_gpu"]["distributed_type"] == configs["multi_node"]["distributed_type"] == "MULTI_GPU"
    assert configs["multi_node"]["num_machines"] > 1
