"""A prepare run killed with SIGKILL mid-way resumes to exactly the cache a clean run makes, a re-run of a
finished cache does no work, and two processes under `accelerate launch` make the same cache as one.

Every run here uses one intra-op thread (OMP_NUM_THREADS=1), as each rank of a multi-process launch does:
a CPU convolution's last bits depend on the thread count, and "the same cache" means bit-equal tensors.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data import media, synth
from data.cache import load_entry, read_meta
from tests.conftest import ROOT, cli_env, write_recipe

pytestmark = pytest.mark.slow
TOTAL = 24  # samples the clips below make


def env() -> dict[str, str]:
    return dict(cli_env(), OMP_NUM_THREADS="1")


def prepare_cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "prepare", str(recipe)]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """8 clips x 3 windows (chunk mode) = 24 samples in two buckets, with two captions each."""
    d = tmp_path_factory.mktemp("resume_clips")
    for i in range(8):
        w, h = (64, 48) if i % 2 else (48, 64)
        path = media.write_video(d / f"clip {i}.mp4", synth.pattern_frames(27, w, h, seed=i))
        path.with_suffix(".txt").write_text(f"clip {i} in colour\nclip number {i}\n", encoding="utf-8")
    return d


def make_recipe(tmp: Path, model: Path, clips: Path, name: str) -> Path:
    return write_recipe(
        tmp / f"{name}.toml",
        f"""
[model]
path = "{model}"
[data]
cache_dir = "{tmp / name}"
cache_dtype = "fp32"
decode_workers = 1
encode_batch_size = 2
validation_prompts = ["a validation prompt"]
[[data.datasets]]
path = "{clips}"
resolutions = [64]
target_frames = [9]
frame_window = "chunk"
""",
    )


@pytest.fixture(scope="module")
def clean(tiny_wan, clips, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("clean")
    run(prepare_cmd(make_recipe(tmp, tiny_wan, clips, "cache")))
    return tmp / "cache"


def entries(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.safetensors"))


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Same entries, bit-equal tensors, same metadata, same index."""
    assert entries(cache) == entries(reference)
    assert len([e for e in entries(cache) if e.startswith("samples/")]) == TOTAL
    for rel in entries(reference):
        got, want = load_entry(cache / rel), load_entry(reference / rel)
        assert got.keys() == want.keys(), rel
        assert all(torch.equal(got[k], want[k]) for k in want), rel
        assert read_meta(cache / rel) == read_meta(reference / rel), rel
    assert (cache / "index.json").read_text() == (reference / "index.json").read_text()
    assert not list(cache.rglob("*.tmp"))


def test_sigkill_mid_run_then_resume_equals_a_clean_run(tiny_wan, clips, clean, tmp_path):
    recipe = make_recipe(tmp_path, tiny_wan, clips, "cache")
    cache = tmp_path / "cache"
    # Kill the whole process group (the CLI and its decode worker) once a few entries exist.
    proc = subprocess.Popen(
        prepare_cmd(recipe),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    try:
        while len(list(cache.glob("samples/**/*.safetensors"))) < 3:
            assert proc.poll() is None, "prepare finished before it could be killed"
            assert time.time() < deadline, "no entries appeared"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(cache.glob("samples/**/*.safetensors")))
    assert 3 <= done < TOTAL and not (cache / "index.json").exists()

    # What else a crash or a full disk can leave: a temp file and a damaged entry. Neither may survive.
    first = sorted(cache.glob("samples/**/*.safetensors"))[0]
    (first.parent / f".{first.name}.x1y2z3.tmp").write_bytes(b"half a file")
    first.write_bytes(first.read_bytes()[:100])

    proc = run(prepare_cmd(recipe))
    report = json.loads((cache / "report.json").read_text())
    assert report["encoded_now"] == TOTAL - done + 1 and report["samples"] == TOTAL
    assert_same_cache(cache, clean)

    # A second re-run has nothing to do: nothing encoded, no entry or index rewritten.
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != "report.json"}
    run(prepare_cmd(recipe))
    report = json.loads((cache / "report.json").read_text())
    assert report["encoded_now"] == report["texts_encoded_now"] == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != "report.json"} == before


def test_changed_source_is_redone_and_orphans_are_only_pruned_on_request(tiny_wan, clips, tmp_path, capsys):
    from data.prepare import prepare
    from trainer.config import load_recipe
    from trainer.models import get_family

    local = tmp_path / "clips"
    local.mkdir()
    for p in sorted(clips.iterdir())[:4]:  # two clips with captions
        (local / p.name).write_bytes(p.read_bytes())
    recipe = load_recipe(make_recipe(tmp_path, tiny_wan, local, "cache"))
    cache = tmp_path / "cache"
    assert prepare(recipe, get_family(recipe.model)) == 0
    clip = sorted(local.glob("*.mp4"))[0]
    media.write_video(clip, synth.pattern_frames(20, 64, 48, seed=99))  # edited: now landscape, 20 frames
    (cache / "samples" / "notes.txt").write_text("a user's file in the cache folder\n")
    assert prepare(recipe, get_family(recipe.model)) == 0
    report = json.loads((cache / "report.json").read_text())
    assert report["encoded_now"] == 2  # 20 frames -> two 9-frame windows, in a new bucket
    index = json.loads((cache / "index.json").read_text())
    assert {tuple(s["bucket"]) for s in index["samples"] if s["source"] == str(clip.resolve())} == {(80, 48)}
    old = report["orphans"]
    assert len(old) == 3 and all(o.startswith("samples/") for o in old)  # the old portrait windows
    assert all((cache / o).exists() for o in old)

    capsys.readouterr()
    assert prepare(recipe, get_family(recipe.model), prune=True) == 0
    assert "pruned 3" in capsys.readouterr().out
    assert not any((cache / o).exists() for o in old)
    assert (cache / "samples" / "notes.txt").exists()  # not ours: never deleted
    texts = {t for s in index["samples"] for t in s["text_ids"]} | set(index["validation"])
    texts |= {index["validation_negative"]} - {None}  # the negative prompt of validation videos
    assert len(entries(cache)) == len(index["samples"]) + len(texts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_make_the_same_cache_as_one(tiny_wan, clips, clean, tmp_path):
    recipe = make_recipe(tmp_path, tiny_wan, clips, "cache")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "trainer.cli", "prepare", str(recipe)]
    proc = subprocess.run(
        launch, cwd=ROOT, env=dict(env(), ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("prepared 24 samples") == 1  # one summary, from the main process
    report = json.loads((tmp_path / "cache/report.json").read_text())
    assert report["encoded_now"] == TOTAL and len(report["encoded_per_process"]) == 2
    assert all(n > 0 for n in report["encoded_per_process"])  # both processes did a share
    assert_same_cache(tmp_path / "cache", clean)
