"""Shared setup of the training tests: a prepared tiny cache, recipes, and real launches in subprocesses
(`vidlora train` alone, or under `accelerate launch` with 2 processes, DDP or DeepSpeed)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from data import media, synth
from tests.conftest import ROOT, cli_env, run_cli, write_recipe

CAPTIONS = [
    "a red car drives through a city street at night",
    "a blue square moves left over a gradient",
    "waves roll onto a sandy beach",
    "a green ball bounces on a wooden floor",
]


def recipe_text(model: Path, cache: Path, out: Path, steps: int = 8, family: str = "wan", **train: object) -> str:
    """A recipe on the tiny model and cache; keyword arguments override [train] keys."""
    keys = {
        "output_dir": str(out),
        "max_steps": steps,
        "learning_rate": 1e-3,
        "checkpoint_every": 4,
        "checkpoints_keep": 50,
        "log_every": 1,
        "dataloader_workers": 0,
        "mixed_precision": "no",
        **train,
    }
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f"""
[model]
family = "{family}"
path = "{model}"
[data]
cache_dir = "{cache}"
cache_dtype = "fp32"
decode_workers = 0
validation_prompts = ["a yellow star spins slowly"]
[[data.datasets]]
path = "{cache.parent / "clips"}"
resolutions = [64]
target_frames = [9]
[lora]
rank = 4
alpha = 4
[train]
{lines}
[logging]
wandb = false
[export]
dtype = "fp32"
"""


def prepare_cache(root: Path, tiny_wan: Path, family: str = "wan") -> tuple[Path, Path]:
    """(tiny model, prepared cache): four real 9-frame clips of one bucket, a validation prompt."""
    clips = root / "clips"
    for i, caption in enumerate(CAPTIONS):
        media.write_video(clips / f"clip{i}.mp4", synth.pattern_frames(9, 64, 64, seed=i))
        (clips / f"clip{i}.txt").write_text(caption + "\n", encoding="utf-8")
    # caption_dropout: the cache also holds the empty prompt's embedding (the runs that set it need it)
    text = recipe_text(tiny_wan, root / "cache", root / "unused", family=family, caption_dropout=0.25)
    recipe = write_recipe(root / "prepare.toml", text)
    run_cli("prepare", recipe)
    return tiny_wan, root / "cache"


def copy_cache(cache: Path, dest: Path) -> Path:
    """A private copy of the prepared cache (index paths are relative, so it works where it lands)."""
    shutil.copytree(cache, dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(recipe: Path, mode: str, *args: str, processes: int = 2) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a real run: mode is "one" (plain `vidlora train`), "ddp"
    (`processes` processes over gloo) or a DeepSpeed accelerate config file."""
    # One thread per process: the tiny model gains nothing from more, and OpenMP threads spinning against
    # other processes on a 2-core machine stall steps for seconds (accelerate launch does the same).
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    cli = ["-m", "trainer.cli", "train", str(recipe), *args]
    if mode == "one":
        return [sys.executable, *cli], env
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launch += ["--num_machines", "1"]
    launch += ["--main_process_port", str(free_port())]
    if mode == "ddp":
        # `--cpu --num_processes 2` silently runs one process; this is real 2-process DDP on the CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        launch += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launch += ["--config_file", mode]
    return [*launch, *cli], env


def train_run(
    recipe: Path,
    mode: str = "one",
    *args: str,
    check: bool = True,
    env: dict | None = None,
    timeout=600,
    processes: int = 2,
):
    cmd, base_env = launch_command(recipe, mode, *args, processes=processes)
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**base_env, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def start_run(recipe: Path, mode: str = "one", *args: str, env: dict | None = None) -> subprocess.Popen:
    """A training run in its own session (process group), as a terminal would run it."""
    cmd, base_env = launch_command(recipe, mode, *args)
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**base_env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> int:
    """Poll metrics.jsonl until it has a line for `step` or later; returns the last logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = last_step(run)
        if last >= step:
            return last
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before step {step}:\n{proc.communicate()[1][-4000:]}"
            )
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the run's process group, as a terminal's Ctrl-C does: `vidlora train` and its DataLoader
    workers (under `accelerate launch`, only the launcher: see job_processes)."""
    os.killpg(proc.pid, sig)


def job_processes(proc: subprocess.Popen) -> list:
    """The launcher and every process under it: what Slurm signals (the whole job step). torchrun starts
    each rank in its own session, so the launcher's process group does not reach the ranks."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def signal_job(processes: list, sig: int) -> None:
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def wait_job(processes: list, timeout: float = 300) -> None:
    """Until every process of the job has exited (a rank still saving must not race the next launch)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still running after {timeout} s: {alive}"


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
