"""Real 2-process launches on the CPU: DDP (gloo), DeepSpeed ZeRO-2/3 and FSDP2 train, checkpoint, resume and
export; N processes with batch size B match one process with batch size N x B; SIGKILL of the whole
launch (the rank processes, not just the launcher) resumes bit for bit, and so does Slurm's SIGTERM to
every process with DataLoader workers on.

Tolerance: the 2-process runs reduce gradients in another order than one process sums a batch, so they
match one process to float32 rounding, amplified a little by Adam: losses within 1e-5 relative; after 8
steps at lr 1e-3 the LoRA within 1e-4 of its norm and lora_B (zero at the start: all of it learned)
within 1e-3 of its norm. Runs of the same launch mode match exactly.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from data.cache import load_entry, read_meta, save_entry
from tests.conftest import ROOT, write_recipe
from tests.training_setup import (
    copy_cache,
    job_processes,
    losses,
    recipe_text,
    signal_job,
    start_run,
    train_run,
    wait_for_step,
    wait_job,
)
from trainer.checkpoint import check_resumable, latest_checkpoint, load_trainer_state, read_adapter
from trainer.config import UserError, load_recipe

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REFERENCE_STEPS = 40  # long enough to be killed mid-run
COMPARE_STEP = 8
ZERO2 = str(ROOT / "recipes/accelerate/zero2.yaml")
FSDP2 = str(ROOT / "recipes/accelerate/fsdp2.yaml")
# accelerate turns FSDP on only for GPUs; on the CPU the trainer does (trainer/train.py: cpu_fsdp)
CPU_FSDP = {"ACCELERATE_USE_CPU": "true"}


def zero3_config(tmp_path) -> str:
    """The shipped ZeRO-3 config, with every parameter sharded: a tiny model would otherwise stay whole
    (parameters under stage3_param_persistence_threshold elements are never partitioned)."""
    cfg = json.loads((ROOT / "recipes/accelerate/zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(cfg))
    yaml = (ROOT / "recipes/accelerate/zero3.yaml").read_text()
    yaml = yaml.replace("recipes/accelerate/zero3.json", str(tmp_path / "zero3.json"))
    (tmp_path / "zero3.yaml").write_text(yaml)
    return str(tmp_path / "zero3.yaml")


def per_rank_recipe(tmp, prepared, name, steps, batch_size, ema=True):
    model, cache = prepared
    # 4 samples of one bucket; global batch 2 per micro-step, 2 micro-steps per optimizer step
    # caption dropout on: the samples that train on the empty prompt are the same for any process count;
    # an EMA of the LoRA too (ZeRO-3 shards the LoRA and refuses it)
    extra = {"ema_decay": 0.9} if ema else {}
    text = recipe_text(
        model, cache, tmp / name, steps, batch_size=batch_size, gradient_accumulation=2, caption_dropout=0.25, **extra
    )
    return write_recipe(tmp / f"{name}.toml", text)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, prepared):
    """An uninterrupted 2-process DDP run, batch size 1 per process, checkpoint every 4 steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = per_rank_recipe(tmp, prepared, "ref", REFERENCE_STEPS, 1)
    proc = train_run(recipe, "ddp")
    assert proc.stdout.count("run: ") == 1  # the ranks print and save once
    assert "vidlora train: DDP over gloo, 2 processes on cpu, mixed precision no" in proc.stdout
    return tmp, recipe, tmp / "ref"


def adapter_at(run, step):
    return read_adapter(run / "checkpoints" / f"step-{step:06d}" / "adapter.safetensors")[0]


def assert_lora_close(a, b):
    """Within 1e-4 of the LoRA's norm, and within 1e-3 of what training learned (lora_B starts at 0)."""
    assert a.keys() == b.keys() and a
    for keys, rel in ((list(a), 1e-4), ([k for k in a if "lora_B" in k], 1e-3)):
        diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
        norm = torch.cat([b[k].flatten() for k in keys]).norm()
        assert diff <= rel * norm, (diff, norm, rel)


def assert_losses_close(a, b, steps):
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), s


def test_ddp_and_deepspeed_match_one_process_and_export(ddp_reference, prepared, tmp_path):
    _, _, ddp = ddp_reference
    ref_losses = losses(ddp)
    reference = adapter_at(ddp, COMPARE_STEP)
    assert any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)  # it trained

    one = per_rank_recipe(tmp_path, prepared, "one", COMPARE_STEP, 2)  # same global batch, one process
    train_run(one, "one")
    runs = {"one": tmp_path / "one"}
    train_run(per_rank_recipe(tmp_path, prepared, "zero2", COMPARE_STEP, 1), ZERO2)
    # ZeRO-3 also validates (every forward needs all ranks: 1 prompt on 2 ranks is padded); validation
    # draws from its own generators, so training is unchanged
    validate = ["validation.every=4", "validation.inference_steps=2", "validation.num_frames=5"]
    validate.append(f"validation.loss_cache_dir={prepared[1]}")
    args = [x for v in validate for x in ("--set", v)]
    train_run(per_rank_recipe(tmp_path, prepared, "zero3", COMPARE_STEP, 1, ema=False), zero3_config(tmp_path), *args)
    runs.update(zero2=tmp_path / "zero2", zero3=tmp_path / "zero3")
    rows = [json.loads(line) for line in (runs["zero3"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    for step in (4, 8):
        assert len(list((runs["zero3"] / f"validation/step-{step:06d}").glob("*.mp4"))) == 1

    reference_ema = load_file(str(ddp / "checkpoints" / f"step-{COMPARE_STEP:06d}" / "ema.safetensors"))
    for name, run in runs.items():
        assert_losses_close(losses(run), ref_losses, range(1, COMPARE_STEP + 1))
        if name != "zero3":  # the EMA is the same for any process count and engine
            ema = load_file(str(run / "checkpoints" / f"step-{COMPARE_STEP:06d}" / "ema.safetensors"))
            assert_lora_close(ema, reference_ema)
        assert_lora_close(adapter_at(run, COMPARE_STEP), reference)
        final, meta = read_adapter(run / "adapter.safetensors")
        assert meta["steps"] == COMPARE_STEP
        assert_lora_close(final, reference)
        assert (run / "pytorch_lora_weights.safetensors").is_file()

    # DeepSpeed checkpoints hold the LoRA only: the frozen base is excluded
    for name in ("zero2", "zero3"):
        files = list((runs[name] / f"checkpoints/step-{COMPARE_STEP:06d}/pytorch_model").glob("*model_states.pt"))
        assert files
        for file in files:
            module = torch.load(file, map_location="cpu", weights_only=False)["module"]  # DeepSpeed's, ours
            assert module and all("lora_" in k for k in module), (name, list(module)[:5])

    # what ZeRO-3 exported (gathered from the shards, not the empty placeholders) loads in diffusers
    pipe = WanPipeline.from_pretrained(prepared[0])
    pipe.load_lora_weights(str(runs["zero3"] / "pytorch_lora_weights.safetensors"))
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert loaded and all(p.abs().sum() > 0 for p in loaded.values())


def test_zero2_in_bf16_resumes_exactly(ddp_reference, prepared, tmp_path):
    """Resume a DeepSpeed run from an earlier checkpoint: the newer one is set aside, the steps after the
    checkpoint repeat exactly. In bf16, the shipped recipes' precision: DeepSpeed casts the whole model to
    bf16 and does not autocast, so the trainer feeds it bf16 inputs (fp32 ones crashed at step 1)."""
    recipe = per_rank_recipe(tmp_path, prepared, "z2", COMPARE_STEP, 1)
    write_recipe(recipe, recipe.read_text().replace('mixed_precision = "no"', 'mixed_precision = "bf16"'))
    proc = train_run(recipe, ZERO2)
    assert "vidlora train: DeepSpeed ZeRO-2 over gloo, 2 processes on cpu, mixed precision bf16" in proc.stdout
    run = tmp_path / "z2"
    first = losses(run)
    first_adapter = adapter_at(run, COMPARE_STEP)
    train_run(recipe, ZERO2, "--resume", str(run / "checkpoints/step-000004"))
    assert (run / "checkpoints/abandoned/step-000008").is_dir()
    assert losses(run) == first  # steps 1-4 kept from before, 5-8 trained again: identical
    again = adapter_at(run, COMPARE_STEP)
    assert all(torch.equal(again[k], first_adapter[k]) for k in first_adapter)


def test_fsdp2_matches_ddp_resumes_exactly_and_exports_for_diffusers(ddp_reference, prepared, tmp_path):
    """The shipped FSDP2 config (torch's fully_shard through accelerate) shards the frozen base and the LoRA over
    both processes and trains what DDP trains: the same reduction of the same gradients (losses and LoRA within the
    module's tolerance; on this machine they come out identical). Its checkpoints hold the LoRA shards only, resume
    exactly, and its export, gathered from the shards, loads in diffusers with the DDP run's weights."""
    _, _, ddp = ddp_reference
    recipe = per_rank_recipe(tmp_path, prepared, "fsdp", COMPARE_STEP, 1, ema=False)  # FSDP shards the LoRA: no EMA
    proc = train_run(recipe, FSDP2, env=CPU_FSDP)
    assert "vidlora train: FSDP2 over gloo, 2 processes on cpu, mixed precision no" in proc.stdout
    run = tmp_path / "fsdp"
    first, reference = losses(run), adapter_at(ddp, COMPARE_STEP)
    assert_losses_close(first, losses(ddp), range(1, COMPARE_STEP + 1))
    norms = [grad_norms(r) for r in (run, ddp)]  # clipping sees the sharded gradients (a stale list gave 0)
    assert all(norms[0][s] == pytest.approx(norms[1][s], rel=1e-4) and norms[0][s] > 0 for s in norms[0])
    final, meta = read_adapter(run / "adapter.safetensors")
    assert meta["steps"] == COMPARE_STEP
    for lora in (adapter_at(run, 4), final):
        assert lora.keys() == reference.keys()
    assert_lora_close(final, reference)
    assert_lora_close(adapter_at(run, 4), adapter_at(ddp, 4))

    # the checkpoint's model part (torch.distributed.checkpoint) is the LoRA only, split between the two ranks
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(run / f"checkpoints/step-{COMPARE_STEP:06d}/pytorch_model_fsdp_0").read_metadata()
    tensors = saved.state_dict_metadata
    assert tensors and all("lora_" in k for k in tensors), list(tensors)[:5]
    assert all(len(t.chunks) == 2 for k, t in tensors.items() if "lora_A" in k)  # rank 4 rows: 2 on each process

    state = load_trainer_state(run / "checkpoints/step-000004")  # its shards resume under FSDP only
    with pytest.raises(UserError, match="checkpoint was saved with FSDP; resume it the same way"):
        check_resumable(state, load_recipe(recipe), 2, deepspeed=False)
    train_run(recipe, FSDP2, "--resume", str(run / "checkpoints/step-000004"), env=CPU_FSDP)
    assert losses(run) == first  # steps 5-8 trained again: identical
    again = read_adapter(run / "adapter.safetensors")[0]
    assert all(torch.equal(again[k], final[k]) for k in final)

    pipe = WanPipeline.from_pretrained(prepared[0])
    pipe.load_lora_weights(str(run / "pytorch_lora_weights.safetensors"))
    loaded = {n.replace(".default_0", ""): p.detach() for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert_lora_close(loaded, reference)


def grad_norms(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r and r["step"] <= COMPARE_STEP}


def resume_matches_reference(recipe, run, reference):
    train_run(recipe, "ddp", "--resume")
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, REFERENCE_STEPS + 1))
    assert got == want  # every step, before and after the stop, bit for bit
    a, b = read_adapter(run / "adapter.safetensors")[0], read_adapter(reference / "adapter.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_ranks_mid_run_then_resume_is_exact(ddp_reference, tmp_path):
    src, recipe, reference = ddp_reference
    text = recipe.read_text().replace(str(reference), str(tmp_path / "run"))
    recipe = write_recipe(tmp_path / "r.toml", text)
    run = tmp_path / "run"
    proc = start_run(recipe, "ddp")
    killed_at = wait_for_step(proc, run, 10)
    job = job_processes(proc)
    signal_job(job, signal.SIGKILL)
    wait_job(job, 60)  # every rank and worker is gone, none keeps training
    assert killed_at < REFERENCE_STEPS
    assert not (run / "adapter.safetensors").exists()
    resume_matches_reference(recipe, run, reference)


def test_sigterm_to_every_process_with_dataloader_workers_saves_and_resumes(ddp_reference, tmp_path):
    """Slurm's time-limit SIGTERM reaches every process of the job: the launcher, the ranks and their
    DataLoader workers, and torchrun forwards it to the ranks again. Both ranks save the step they stop
    at. Workers only load data, so the reference (no workers) is the uninterrupted run."""
    _, recipe, reference = ddp_reference
    text = recipe.read_text().replace(str(reference), str(tmp_path / "run"))
    assert "dataloader_workers = 0" in text
    recipe = write_recipe(tmp_path / "r.toml", text.replace("dataloader_workers = 0", "dataloader_workers = 2"))
    run = tmp_path / "run"
    proc = start_run(recipe, "ddp")
    wait_for_step(proc, run, 6)
    job = job_processes(proc)
    assert len(job) >= 7  # launcher, 2 ranks, 2 workers each
    signal_job(job, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    wait_job(job)
    assert "killed by signal" not in err and "interrupted: stopped at step" in err, err[-3000:]
    stopped = max(losses(run))
    assert stopped < REFERENCE_STEPS and latest_checkpoint(run / "checkpoints").name == f"step-{stopped:06d}"
    assert not (run / "adapter.safetensors").exists()
    resume_matches_reference(recipe, run, reference)


def test_zero2_skips_a_nonfinite_step_on_every_rank(prepared, tmp_path):
    """A NaN in one cached sample: only the rank holding it sees a bad loss, yet both ranks skip the step
    (one all-reduce) and DeepSpeed applies no update (a NaN update would poison every later weight); no
    checkpoint is taken at a skipped step; the run goes on."""
    model, cache = prepared
    cache = copy_cache(cache, tmp_path / "cache")
    bad = sorted((cache / "samples").rglob("*.safetensors"))[0]
    tensors, meta = load_entry(bad), read_meta(bad)
    tensors["latents"][0, 0, 0, 0] = float("nan")
    save_entry(bad, tensors, meta)
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(model, cache, tmp_path / "run", 4, checkpoint_every=1))
    proc = train_run(recipe, ZERO2)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r["loss"] is None]
    assert len(skipped) == 2 and rows[-1]["skipped_steps"] == 2  # global batch 2 of 4 samples: once per epoch
    assert proc.stdout.count("non-finite loss") == 2  # reported by the rank that had the sample
    for step in range(1, 5):
        assert (run / f"checkpoints/step-{step:06d}").is_dir() == (step not in skipped), step
    for step in range(2, 5):
        if step not in skipped and step - 1 not in skipped:  # a finite step updates the LoRA
            before, after = adapter_at(run, step - 1), adapter_at(run, step)
            assert not all(torch.equal(before[k], after[k]) for k in before), step
    final = read_adapter(run / "adapter.safetensors")[0]
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="launches that only go wrong without GPUs")
def test_launches_that_would_not_run_what_they_ask_for_stop_before_writing(prepared, tmp_path):
    """Without GPUs, the multi-GPU config starts unconnected processes that would race on one run folder,
    and ACCELERATE_USE_CPU=true silently turns a DeepSpeed config into plain DDP: both stop at once."""
    recipe = per_rank_recipe(tmp_path, prepared, "run", 2, 1)
    proc = train_run(recipe, str(ROOT / "recipes/accelerate/multi_gpu.yaml"), check=False)
    assert proc.returncode != 0
    assert "2 processes were launched but each one runs alone (1 process)" in proc.stderr
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu" in proc.stderr
    proc = train_run(recipe, ZERO2, check=False, env={"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode != 0
    assert "asks for DeepSpeed, but ACCELERATE_USE_CPU=true (or --cpu) turns it into plain DDP" in proc.stderr
    proc = train_run(recipe, FSDP2, "--set", "lora.kind=dora", check=False, env=CPU_FSDP)
    assert proc.returncode != 0 and "lora.kind = 'dora' does not work under FSDP" in proc.stderr
    assert not (tmp_path / "run").exists()
