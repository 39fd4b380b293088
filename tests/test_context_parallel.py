"""Context parallelism (train.context_parallel): real 2-process launches over gloo split each sample's sequence
with diffusers' Ulysses attention and train what one process computing the whole sequence trains, under DDP and under
FSDP2; validation and exact resume (also after a SIGKILL) work the same under it; setups that cannot run are refused
in one line.

Tolerance: the processes sum their sequence halves' LoRA gradients in another order than one process sums the
whole sequence, and attention runs on half the heads' all-to-all exchanged inputs: float32 rounding, amplified a
little by Adam. Losses within 1e-5 relative; the LoRA as in tests/test_multiprocess.py (1e-4 of its norm, lora_B
within 1e-3 of what was learned). Ring attention needs an attention backend that returns the log-sum-exp, and none
runs on the CPU (diffusers' SDPA backend has no log-sum-exp; _native_flash / _native_cudnn are CUDA ops): on the
CPU it is refused, on a GPU scripts/check_context_parallel_gpu.sh checks it.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest
import torch

from tests.conftest import run_cli, write_recipe
from tests.test_multiprocess import CPU_FSDP, FSDP2, assert_lora_close
from tests.training_setup import (
    job_processes,
    losses,
    recipe_text,
    signal_job,
    start_run,
    train_run,
    wait_for_step,
    wait_job,
)
from trainer.checkpoint import KILL_IN_CHECKPOINT, latest_checkpoint, read_adapter
from trainer.config import TrainSection, UserError
from trainer.parallel import check_context_parallel, layout

STEPS = 4


def cp_recipe(tmp, prepared, name, **train):
    """4 steps of 2 micro-batches of 1 sample; validation (loss and one video) every 2 steps."""
    model, cache = prepared
    text = recipe_text(model, cache, tmp / name, STEPS, checkpoint_every=2, gradient_accumulation=2, **train)
    text += f'[validation]\nevery = 2\ninference_steps = 2\nnum_frames = 5\nloss_cache_dir = "{cache}"\n'
    return write_recipe(tmp / f"{name}.toml", text)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared):
    """The same recipe trained by one process and by two processes sharing each sample (Ulysses)."""
    tmp = tmp_path_factory.mktemp("cp")
    train_run(cp_recipe(tmp, prepared, "one"))
    recipe = cp_recipe(tmp, prepared, "cp", context_parallel=2)
    proc = train_run(recipe, "ddp")
    assert "context parallel (ulysses): 1 group(s) of 2 processes, each sample's sequence split" in proc.stdout
    return tmp / "one", tmp / "cp", recipe


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ulysses_two_processes_train_what_one_process_trains(runs):
    one, cp, _ = runs
    want, got = losses(one), losses(cp)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    val = {r["step"]: r["val_loss"] for r in rows(one) if "val_loss" in r}
    assert sorted(val) == [2, 4]
    for step, value in ((r["step"], r["val_loss"]) for r in rows(cp) if "val_loss" in r):
        assert value == pytest.approx(val[step], rel=1e-5)
    for step in (2, 4):
        assert len(list((cp / f"validation/step-{step:06d}").glob("*.mp4"))) == 1
    final = read_adapter(cp / "adapter.safetensors")[0]
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # it trained
    assert_lora_close(final, read_adapter(one / "adapter.safetensors")[0])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_under_context_parallelism_is_exact(runs):
    _, cp, recipe = runs
    first, adapter = losses(cp), read_adapter(cp / "adapter.safetensors")[0]
    train_run(recipe, "ddp", "--resume", str(cp / "checkpoints/step-000002"))
    assert losses(cp) == first  # steps 3-4 trained again by the same two processes: identical
    again = read_adapter(cp / "adapter.safetensors")[0]
    assert all(torch.equal(again[k], adapter[k]) for k in adapter)


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigkill_under_context_parallelism_then_resume_is_exact(runs, tmp_path):
    """The main rank is SIGKILLed inside the step-4 checkpoint (written, not yet renamed: the fault injection of
    trainer/checkpoint.py, a deterministic moment), then the rest of the job: the launcher and the other rank, which
    waits for it. `--resume` finds step 2, and the run ends as the uninterrupted one did, bit for bit."""
    _, reference, recipe = runs
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", recipe.read_text().replace(str(reference), str(run)))
    proc = start_run(recipe, "ddp", env={KILL_IN_CHECKPOINT: str(STEPS)})
    wait_for_step(proc, run, 1)
    job = job_processes(proc)
    deadline = time.monotonic() + 300
    while all(alive(p) for p in job) and time.monotonic() < deadline:  # until the main rank has killed itself
        time.sleep(0.05)
    signal_job(job, signal.SIGKILL)
    wait_job(job, 60)
    assert (run / f"checkpoints/.tmp-step-{STEPS:06d}").is_dir()  # killed inside the save
    assert latest_checkpoint(run / "checkpoints").name == "step-000002"
    assert not (run / "adapter.safetensors").exists()
    train_run(recipe, "ddp", "--resume")
    assert losses(run) == losses(reference)
    a, b = read_adapter(run / "adapter.safetensors")[0], read_adapter(reference / "adapter.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_composes_with_context_parallelism(runs, tmp_path):
    """FSDP2 shards over all processes and averages gradients over them as DDP does, so the loss scaling of
    trainer/parallel.py holds: 2 processes sharing each sample under the shipped FSDP2 config train what one
    process trains."""
    one, _, recipe = runs
    run = tmp_path / "cp"
    recipe = write_recipe(tmp_path / "r.toml", recipe.read_text().replace(str(runs[1]), str(run)))
    proc = train_run(recipe, FSDP2, env=CPU_FSDP)
    assert "vidlora train: FSDP2 over gloo, 2 processes on cpu" in proc.stdout
    assert "context parallel (ulysses): 1 group(s) of 2 processes" in proc.stdout
    want, got = losses(one), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    val = {r["step"]: r["val_loss"] for r in rows(one) if "val_loss" in r}
    got_val = {r["step"]: r["val_loss"] for r in rows(run) if "val_loss" in r}  # validation runs the sharded model
    assert sorted(got_val) == [2, 4] and all(got_val[s] == pytest.approx(val[s], rel=1e-5) for s in val)
    assert len(list((run / "validation/step-000004").glob("*.mp4"))) == 1
    assert_lora_close(read_adapter(run / "adapter.safetensors")[0], read_adapter(one / "adapter.safetensors")[0])


def test_degree_that_does_not_divide_the_processes_is_refused(prepared, tmp_path):
    recipe = cp_recipe(tmp_path, prepared, "r", context_parallel=2)
    proc = run_cli("train", recipe, check=False)
    assert proc.returncode == 2
    assert "vidlora: error: train.context_parallel = 2 does not divide the 1 launched process(es)" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_setups_that_cannot_run_are_refused():
    from trainer.models.hunyuan_video import HunyuanVideo
    from trainer.models.wan import Wan

    cpu, shapes = torch.device("cpu"), [(64, 64, 9)]

    def refused(family, match, device=cpu, shapes=shapes, deepspeed=False, **train):
        t = TrainSection(context_parallel=2, **train)
        with pytest.raises(UserError, match=match):
            check_context_parallel(t, family, 2, device, deepspeed, shapes)

    check_context_parallel(TrainSection(context_parallel=2), Wan, 4, cpu, False, shapes)  # 2 groups of 2
    refused(HunyuanVideo, "the hunyuan_video family has no context-parallel plan")
    refused(
        Wan,
        'context_parallel_kind = "ring" needs an attention backend .* none of them runs on the cpu: use "ulysses"',
        context_parallel_kind="ring",
    )
    refused(Wan, "'sdpa' cannot run ring attention; use one of", torch.device("cuda"), context_parallel_kind="ring")
    refused(Wan, "not with DeepSpeed", deepspeed=True)
    refused(Wan, "does not combine with train.token_routing", token_routing=0.5)
    # 64x64, 5 frames: 2 latent frames of 4x4 patches, 32 tokens; 48x16, 1 frame: 1 latent frame of 3x1 patches
    refused(Wan, "samples of 48x16, 1 frames have 3 tokens, not a multiple of 2", shapes=[(64, 64, 5), (48, 16, 1)])


def test_layout_groups_neighbouring_ranks():
    assert [(g.dp_rank, g.cp_rank, g.lead) for g in (layout(2, r, 4) for r in range(4))] == [
        (0, 0, True),
        (0, 1, False),
        (1, 0, True),
        (1, 1, False),
    ]
    assert layout(1, 3, 4) == layout(1, 3, 4) and layout(1, 3, 4).dp == 4


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_data_parallel_groups_of_two_train_what_two_ddp_processes_train(prepared, tmp_path):
    """4 processes as 2 DP x 2 CP, one sample per group and micro-step, against one process with two samples per
    micro-step: what 2 DDP processes train (tests/test_multiprocess.py). Validation off: training alone."""
    model, cache = prepared

    def recipe(name, **train):
        text = recipe_text(model, cache, tmp_path / name, 2, gradient_accumulation=2, **train)
        return write_recipe(tmp_path / f"{name}.toml", text)

    train_run(recipe("one", batch_size=2))
    proc = train_run(recipe("dpcp", context_parallel=2), "ddp", processes=4)
    assert "context parallel (ulysses): 2 group(s) of 2 processes" in proc.stdout
    want, got = losses(tmp_path / "one"), losses(tmp_path / "dpcp")
    assert sorted(got) == [1, 2]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    a, b = (read_adapter(tmp_path / name / "adapter.safetensors")[0] for name in ("dpcp", "one"))
    assert_lora_close(a, b)
