"""Exact resume of real `vidlora train` processes on the CPU (fp32): SIGKILL mid-run, SIGKILL inside a
checkpoint write (also the first one, then docs/training.md's Slurm requeue line), Ctrl-C and SIGTERM; each
resumed run's per-step losses and final LoRA equal an uninterrupted run's exactly, and metrics.jsonl has
each step once. The runs use DataLoader workers and LoRA dropout, the two usual sources of drift, and caption
dropout."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess

import pytest
import torch

from tests.conftest import ROOT, write_recipe
from tests.training_setup import (
    kill_group,
    launch_command,
    losses,
    recipe_text,
    start_run,
    train_run,
    wait_for_step,
)
from trainer.checkpoint import KILL_IN_CHECKPOINT, latest_checkpoint, read_adapter

pytestmark = pytest.mark.slow

STEPS = 60


def make_recipe(tmp, prepared, name):
    model, cache = prepared
    text = recipe_text(model, cache, tmp / name, STEPS, checkpoint_every=5, dataloader_workers=2, caption_dropout=0.25)
    return write_recipe(tmp / f"{name}.toml", text.replace("alpha = 4", "alpha = 4\ndropout = 0.1"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared):
    tmp = tmp_path_factory.mktemp("resume")
    train_run(make_recipe(tmp, prepared, "ref"))
    return tmp / "ref"


def assert_same_run(run, reference):
    got, want = losses(run), losses(reference)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step once, in order
    assert got == want
    a, b = read_adapter(run / "adapter.safetensors")[0], read_adapter(reference / "adapter.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_mid_run_then_resume_is_exact(reference, prepared, tmp_path):
    recipe = make_recipe(tmp_path, prepared, "run")
    run = tmp_path / "run"
    proc = start_run(recipe)
    wait_for_step(proc, run, 12)
    kill_group(proc)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "adapter.safetensors").exists()
    resumed_from = latest_checkpoint(run / "checkpoints")
    assert resumed_from is not None
    train_run(recipe, "one", "--resume")
    assert_same_run(run, reference)


def test_kill_inside_checkpoint_write_leaves_previous_one(reference, prepared, tmp_path):
    recipe = make_recipe(tmp_path, prepared, "run")
    run = tmp_path / "run"
    proc = train_run(recipe, check=False, env={KILL_IN_CHECKPOINT: "15"})
    assert proc.returncode == -signal.SIGKILL
    checkpoints = run / "checkpoints"
    assert (checkpoints / ".tmp-step-000015").is_dir()  # written, never renamed
    assert not (checkpoints / "step-000015").exists()
    assert latest_checkpoint(checkpoints).name == "step-000010"
    train_run(recipe, "one", "--resume")
    assert not list(checkpoints.glob(".tmp-*"))
    assert_same_run(run, reference)


def slurm_resume_flag(run):
    """What docs/training.md's Slurm script passes to `vidlora train` on a requeue of this run."""
    line = next(x for x in (ROOT / "docs/training.md").read_text().splitlines() if x.startswith("RESUME="))
    line = line.replace("runs/my_run", str(run))
    return subprocess.run(["bash", "-c", f'{line}; printf %s "$RESUME"'], capture_output=True, text=True).stdout


def test_kill_inside_the_first_checkpoint_write_then_slurm_requeue(reference, prepared, tmp_path):
    recipe = make_recipe(tmp_path, prepared, "run")
    run = tmp_path / "run"
    proc = train_run(recipe, check=False, env={KILL_IN_CHECKPOINT: "5"})
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in (run / "checkpoints").iterdir()] == [".tmp-step-000005"]
    assert slurm_resume_flag(run) == "--resume"
    proc = train_run(recipe, "one", "--resume")
    warnings = [line for line in proc.stderr.splitlines() if "no complete checkpoint" in line]
    assert len(warnings) == 1 and "starting from step 0" in warnings[0], proc.stderr[-3000:]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert_same_run(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resumes_exactly(sig, reference, prepared, tmp_path):
    """What a terminal's Ctrl-C and Slurm's time-limit SIGTERM do: signal the trainer and its DataLoader
    workers (the whole process group). The workers must not die under the trainer before it saves."""
    recipe = make_recipe(tmp_path, prepared, "run")
    run = tmp_path / "run"
    proc = start_run(recipe, "one", "--set", "train.log_every=1")
    wait_for_step(proc, run, 7)
    kill_group(proc, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "\nvidlora: interrupted: stopped at step" in err
    latest = latest_checkpoint(run / "checkpoints")
    assert latest is not None and latest.name == f"step-{max(losses(run)):06d}"  # saved at the stop step
    assert not (run / "adapter.safetensors").exists()
    # the message gives the exact command that resumes, the user's --set included: run it as printed
    command = next(x for x in err.splitlines() if x.startswith("resume with: "))
    assert command == f"resume with: vidlora train {recipe} --set train.log_every=1 --resume"
    cmd, env = launch_command(recipe, "one")
    argv = shlex.split(command.removeprefix("resume with: "))
    subprocess.run([*cmd[:3], *argv[1:]], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert_same_run(run, reference)


def test_resume_of_a_finished_run_says_so_and_trains_nothing(reference, prepared, tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    recipe = make_recipe(tmp_path, prepared, "ref")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = train_run(recipe, "one", "--resume")
    assert f"vidlora: {run} already finished at step {STEPS} (train.max_steps = {STEPS}): nothing to train" in (
        proc.stdout
    )
    assert "Traceback" not in proc.stderr and "train:" not in proc.stderr  # no progress bar: nothing trained
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == {
        p: t for p, t in before.items() if p.name != ".lock"
    }


def test_fresh_run_refuses_a_folder_with_checkpoints(reference, prepared, tmp_path):
    recipe = make_recipe(tmp_path, prepared, "ref")
    text = recipe.read_text().replace(str(tmp_path / "ref"), str(reference))
    proc = train_run(write_recipe(recipe, text), check=False)
    assert proc.returncode == 2
    assert "already holds step-000060" in proc.stderr and "--resume" in proc.stderr
