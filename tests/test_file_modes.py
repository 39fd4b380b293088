"""Files vidlora writes get the mode a plain open() gives (0666 & ~umask), so another user (a ComfyUI
service, a teammate) can read them. Atomic writes used to keep their temp file's 0600 after the rename."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from data.cache import atomic_write
from tests.conftest import ROOT, cli_env, write_recipe
from tests.training_setup import recipe_text


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "index.json", lambda p: Path(p).write_text("{}"))
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "index.json") == mode(tmp_path / "plain.json") == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def vidlora(*args: object, umask: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *map(str, args)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        umask=umask,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_every_file_of_prepare_train_export_merge_follows_the_umask(prepared, tmp_path):
    """Under umask 027 (group may read, others nothing) every file is 0640: cache entries, index.json,
    checkpoints, adapters, exports and a merged model; neither 0600 nor a hard-coded 0644."""
    model, cache = prepared
    (tmp_path / "clips").mkdir()
    for name in ("clip0.mp4", "clip0.txt"):
        shutil.copy(cache.parent / "clips" / name, tmp_path / "clips" / name)
    text = recipe_text(model, tmp_path / "cache", tmp_path / "run", 2, checkpoint_every=1)
    recipe = write_recipe(tmp_path / "r.toml", text)
    umask = 0o027
    vidlora("prepare", recipe, umask=umask)
    vidlora("train", recipe, umask=umask)
    vidlora("export", tmp_path / "run", "--format", "comfyui", "--out-dir", tmp_path / "exports", umask=umask)
    vidlora("merge", model, tmp_path / "run", "--out", tmp_path / "merged", umask=umask)

    files = [p for d in ("cache", "run", "exports", "merged") for p in (tmp_path / d).rglob("*") if p.is_file()]
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert {"cache/index.json", "run/adapter.safetensors", "run/pytorch_lora_weights.safetensors"} <= names
    assert {"run/checkpoints/latest", "merged/diffusion_pytorch_model.safetensors"} <= names
    assert any(n.startswith("cache/samples/") for n in names) and any(n.startswith("exports/") for n in names)
    wrong = {p.relative_to(tmp_path).as_posix(): oct(mode(p)) for p in files if mode(p) != 0o666 & ~umask}
    assert not wrong
