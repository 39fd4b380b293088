"""A hub id as model.path with no network: one line instead of huggingface_hub's retries and a traceback, or the
local cache's copy when it has one. The hub is made unreachable by pointing HF_ENDPOINT at a closed local port."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from data.media import probe
from tests.conftest import ROOT, cli_env, write_recipe

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
SIZE = ["--width", "32", "--height", "32", "--frames", "1", "--steps", "1"]


def run_without_hub(tmp_path, *args):
    """`vidlora ARGS` with HF_HUB_OFFLINE unset, the hub unreachable and an empty (or the test's) hub cache."""
    env = {k: v for k, v in cli_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=CLOSED_PORT, HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "trainer.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_unreachable_hub_id_not_in_the_cache_is_one_line(tmp_path):
    hub_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    recipe = write_recipe(tmp_path / "r.toml", f'[model]\npath = "{hub_id}"\n')
    proc = run_without_hub(tmp_path, "sample", recipe, "--prompt", "a cat", "--out", tmp_path / "s.mp4", *SIZE)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Retry" not in proc.stderr  # no retry loop ran
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vidlora: error: cannot reach the hub for {hub_id} ({CLOSED_PORT}"), line
    assert "not in the local cache" in line and "local folder" in line and "HF_HUB_OFFLINE=1" in line


@pytest.mark.slow
def test_unreachable_hub_id_in_the_cache_loads_from_it(tmp_path, tiny_wan):
    """The tiny model laid out as huggingface_hub caches a download (refs/main -> snapshots/<commit>/)."""
    repo = tmp_path / "hf" / "hub" / "models--vidlora--tiny-wan"
    commit = "0" * 40
    shutil.copytree(tiny_wan, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    recipe = write_recipe(tmp_path / "r.toml", '[model]\npath = "vidlora/tiny-wan"\n')
    out = tmp_path / "s.mp4"
    proc = run_without_hub(tmp_path, "sample", recipe, "--prompt", "a cat", "--out", out, *SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Retry" not in proc.stderr
    assert "cannot reach the hub for vidlora/tiny-wan" in proc.stderr and "its copy in the local cache" in proc.stderr
    assert probe(out).num_frames == 1
