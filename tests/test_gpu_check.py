"""scripts/gpu_check.sh --dry-run: the GPU check's whole plan at toy sizes on this machine, so the script is known to
work before a GPU runs it; the cases this machine cannot run are listed as skipped with why."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.conftest import ROOT, cli_env


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_table(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env={**cli_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    ran = ["wan-checkpointing", "wan-no-checkpointing", "wan-big-checkpointing", "hunyuan-checkpointing"]
    ran += ["fp8-base", "token-routing-0.5", "block-offload"]
    for case in ran:
        assert case in rows and "skipped" not in rows[case] and "failed" not in rows[case], table
        assert " s/step" not in rows[case] and rows[case].count("GiB") == 1
    assert "| 1.00 |" in rows["wan-checkpointing"]  # the first row is the ratios' base
    if not torch.cuda.is_available():
        assert "skipped: needs a CUDA GPU" in rows["attention-cudnn"]
        assert "skipped: needs a GPU with fp8 tensor cores" in rows["fp8-compute"]
    assert "attention-flash3" in rows
