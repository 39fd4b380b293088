"""Shared fixtures: a tiny Wan model folder and helpers that run the real `vidlora` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh runs one worker per core: one thread each, subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1", **extra)
    return env


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`vidlora ARGS` exactly as a user runs it (python -m trainer.cli), output captured; `env` adds variables."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *map(str, args)],
        cwd=cwd or ROOT,
        env=cli_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vidlora {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    """A tiny Wan 2.1 T2V folder, written by the real `vidlora make-tiny wan`."""
    out = tmp_path_factory.mktemp("models") / "wan"
    run_cli("make-tiny", "wan", out)
    return out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_wan) -> tuple[Path, Path]:
    """(tiny Wan model, prepared cache) for the training tests (tests/training_setup.py)."""
    from tests.training_setup import prepare_cache

    return prepare_cache(tmp_path_factory.mktemp("training"), tiny_wan)


@pytest.fixture(scope="session")
def validated_run(tmp_path_factory, prepared) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(recipe, run folder, finished `vidlora train` process): 6 steps on the prepared cache, validation (videos and
    loss) every 3 steps and before training, one clip held out, wandb offline."""
    from tests.training_setup import recipe_text, train_run

    model, cache = prepared
    tmp = tmp_path_factory.mktemp("validation")
    text = recipe_text(model, cache, tmp / "run", 6, log_every=2).replace("wandb = false", 'project = "vidlora-test"')
    text += "[validation]\nevery = 3\nat_start = true\nholdout_clips = 1\ninference_steps = 2\nnum_frames = 5\n"
    recipe = write_recipe(tmp / "r.toml", text)
    return recipe, tmp / "run", train_run(recipe)


def train_capturing(recipe, on_build=None):
    """`vidlora train` in-process (the real loop, unchanged), keeping what build_model made. `recipe` is a recipe path
    or a loaded Recipe; returns (run folder, the trained transformer), or (run folder, the Denoisers) for a run with
    several experts. `on_build` sees the Denoisers."""
    from trainer import train as train_module
    from trainer.config import load_recipe

    captured = {}
    real = train_module.build_model

    def spy(*args, **kwargs):
        captured["model"] = real(*args, **kwargs)
        if on_build:
            on_build(captured["model"])
        return captured["model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build_model", spy)
        run = train_module.train(recipe if not isinstance(recipe, (str, Path)) else load_recipe(recipe))
    experts = captured["model"].experts
    return run, next(iter(experts.values())) if len(experts) == 1 else captured["model"]


def fixed_eval_loss(family, transformer, latents, batch) -> float:
    """Flow-matching loss at fixed noise levels and fixed noise: comparable before and after training."""
    import torch

    from trainer.flow_matching import flow_mse, noisy_and_target

    losses = []
    with torch.no_grad():
        for i, s in enumerate([0.2, 0.4, 0.6, 0.8]):
            sigmas = torch.tensor([s])
            noisy, target = noisy_and_target(latents, sigmas, torch.Generator().manual_seed(100 + i))
            pred = family.predict(transformer, noisy, sigmas, batch)
            losses.append(flow_mse(pred, target, family.loss_weight({**batch, "latents": latents})).item())
    return sum(losses) / len(losses)


def assert_diffusers_reproduces(pipeline_class, model_dir, lora_file, family, trained, shape, batch) -> None:
    """The real client: a fresh `pipeline_class` with `lora_file` loaded by diffusers' own `load_lora_weights`
    gives the trained transformer's outputs on a fixed input (no vidlora code on the loading side)."""
    import torch

    pipe = pipeline_class.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_file))
    noisy = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.5] * shape[0])
    with torch.no_grad():
        expected = family.predict(trained, noisy, sigmas, batch)
        got = family.predict(pipe.transformer, noisy, sigmas, batch)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (Path(lora_file).name, (got - expected).abs().max())


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine their spinning costs seconds (modules that
    time or compile tiny models use it: `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
