"""`train.ema_decay`: the EMA of the LoRA weights on real `vidlora train` processes (CPU, fp32). It follows its formula
step by step (checked against every checkpoint's raw weights), is validated next to the raw weights, becomes the run's
adapter with `export.use_ema`, and survives a SIGKILL + `--resume` bit for bit."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import write_recipe
from tests.training_setup import kill_group, losses, recipe_text, start_run, train_run, wait_for_step
from trainer.checkpoint import latest_checkpoint, read_adapter

pytestmark = pytest.mark.slow
STEPS = 6
DECAY = 0.8


def make_recipe(tmp, prepared, name):
    model, cache = prepared
    text = recipe_text(model, cache, tmp / name, STEPS, checkpoint_every=1, ema_decay=DECAY)
    text += "use_ema = true\n"  # [export] is the last section
    text += "[validation]\nevery = 3\nholdout_clips = 1\nvideos = false\n"
    return write_recipe(tmp / f"{name}.toml", text)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared):
    tmp = tmp_path_factory.mktemp("ema")
    train_run(make_recipe(tmp, prepared, "ref"))
    return tmp / "ref"


def ema_by_peft_key(checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA under the adapter's keys (`experts.transformer.X.lora_A.default.weight` -> `X.lora_A.weight`)."""
    state = load_file(checkpoint / "ema.safetensors")
    return {k.split(".", 2)[2].replace(".default", ""): v for k, v in state.items()}


def test_ema_follows_its_formula_and_is_the_exported_adapter(reference):
    checkpoints = reference / "checkpoints"
    for step in range(2, STEPS + 1):
        previous = ema_by_peft_key(checkpoints / f"step-{step - 1:06d}")
        now = ema_by_peft_key(checkpoints / f"step-{step:06d}")
        raw = read_adapter(checkpoints / f"step-{step:06d}" / "adapter.safetensors")[0]
        assert now.keys() == raw.keys()
        for k in raw:
            torch.testing.assert_close(now[k], DECAY * previous[k] + (1 - DECAY) * raw[k], rtol=1e-6, atol=1e-7)
    final, meta = read_adapter(reference / "adapter.safetensors")
    ema = ema_by_peft_key(checkpoints / f"step-{STEPS:06d}")
    raw = read_adapter(checkpoints / f"step-{STEPS:06d}" / "adapter.safetensors")[0]
    assert all(torch.equal(final[k], ema[k]) for k in ema) and meta["ema_decay"] == DECAY
    assert not all(torch.equal(final[k], raw[k]) for k in raw)  # the raw weights stay in the checkpoint
    with safe_open(str(reference / "pytorch_lora_weights.safetensors"), "pt") as f:  # exports are made from it
        b = next(k for k in f.keys() if k.endswith("lora_B.weight"))  # noqa: SIM118
        assert torch.equal(f.get_tensor(b), ema[b.removeprefix("transformer.")])
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    validated = {r["step"]: r for r in rows if "val_loss" in r}
    assert sorted(validated) == [3, 6]
    assert all(r["ema_val_loss"] > 0 and r["ema_val_loss"] != r["val_loss"] for r in validated.values())


def test_sigkill_then_resume_continues_the_ema_exactly(reference, prepared, tmp_path):
    recipe = make_recipe(tmp_path, prepared, "run")
    run = tmp_path / "run"
    proc = start_run(recipe)
    wait_for_step(proc, run, 3)
    kill_group(proc)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert latest_checkpoint(run / "checkpoints") is not None and not (run / "adapter.safetensors").exists()
    train_run(recipe, "one", "--resume")
    assert losses(run) == losses(reference)
    a, b = read_adapter(run / "adapter.safetensors")[0], read_adapter(reference / "adapter.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    ema = [json.loads(line).get("ema_val_loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line).get("ema_val_loss") for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert ema == want
