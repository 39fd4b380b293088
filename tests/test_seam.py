"""The model-family seam: a family is one file in trainer/models/ plus one registry line, and nothing else names it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, write_recipe
from tests.plugin_family import NAME, REGISTRATION
from trainer.models import FAMILIES

# A string that reads as a family name: every registered one, and anything spelled like one (wan22, hunyuan_video15).
FAMILY_LIKE = re.compile(r"(wan|hunyuan)(_[a-z0-9]+|[0-9][a-z0-9_]*)*(_video)?[0-9]*")


def python_files(*folders: str) -> list[Path]:
    return [
        p for folder in folders for p in (ROOT / folder).rglob("*.py") if "models" not in p.relative_to(ROOT).parts[:2]
    ]


def test_no_code_outside_trainer_models_names_a_family():
    named = []
    for path in python_files("trainer", "data", "scripts"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            if text is not None and (text in FAMILIES or FAMILY_LIKE.fullmatch(text)):
                named.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert named == [], "family names outside trainer/models/:\n" + "\n".join(named)


def test_data_imports_no_family_loop_or_export_code():
    """data/ may read the recipe schema; what needs a model family is handed one (dependencies run one way)."""
    wrong = []
    for path in python_files("data"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            wrong += [f"{path.name}: {m}" for m in modules if m.startswith("trainer") and m != "trainer.config"]
    assert wrong == []


@pytest.mark.slow
def test_a_new_family_plugs_in_with_one_registration(tmp_path):
    """A family defined in a test module and registered by name only runs make-tiny -> prepare -> train -> export ->
    convert, and what it declares (here its bucket step) is what prepare uses."""
    from data import synth
    from data.media import write_video

    env = {"VIDLORA_FAMILIES": REGISTRATION}
    run_cli("make-tiny", NAME, tmp_path / "model", env=env)
    for i in range(2):
        write_video(tmp_path / f"clips/c{i}.mp4", synth.pattern_frames(5, 80, 48, seed=i))
        (tmp_path / f"clips/c{i}.txt").write_text("a blue square moves left over a gradient")
    recipe = write_recipe(
        tmp_path / "r.toml",
        f"""
[model]
family = "{NAME}"
path = "{tmp_path / "model"}"
[data]
cache_dir = "{tmp_path / "cache"}"
decode_workers = 0
[[data.datasets]]
path = "{tmp_path / "clips"}"
resolutions = [64]
target_frames = [5]
[lora]
rank = 2
[train]
output_dir = "{tmp_path / "run"}"
max_steps = 2
dataloader_workers = 0
[logging]
wandb = false
[export]
formats = ["diffusers", "comfyui", "kohya"]
""",
    )
    run_cli("prepare", recipe, env=env)
    index = json.loads((tmp_path / "cache/index.json").read_text())
    assert index["family"] == NAME
    assert all(side % 32 == 0 for s in index["samples"] for side in s["bucket"])  # the family's step, not 16
    run_cli("train", recipe, env=env)
    out = run_cli("export", tmp_path / "run", "--format", "all", "--out-dir", tmp_path / "exports", env=env).stdout
    assert out.count(f"({NAME}, from vidlora") == 3
    converted = run_cli(
        "convert",
        tmp_path / "exports/run_kohya.safetensors",
        "--to",
        "comfyui",
        "--out-dir",
        tmp_path / "back",
        env=env,
    ).stdout
    assert f"({NAME}, from kohya" in converted
    from trainer.formats import load_lora

    assert load_lora(tmp_path / "back/run_kohya_comfyui.safetensors")[1]["family"] == NAME
