"""scripts/bench_memory.py counts a step's activations on the meta device: the count must be what a real run saves."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env

spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "scripts/bench_memory.py")
bench_memory = sys.modules["bench_memory"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_memory)

# Both counts in a fresh process: what autograd saves depends on process-wide state (the SDPA kernel PyTorch picks),
# which earlier tests of a pytest process may have changed.
COUNT = """
import dataclasses, json, sys
sys.path.insert(0, "scripts")
import bench_memory
from trainer.perf import presets
preset = presets()[sys.argv[1]]
out = {}
for device, fused in (("meta", True), ("cpu", False)):
    r = bench_memory.measure(preset, 9, 64, 64, "default", 4, device, fused=fused)
    out[device] = {**dataclasses.asdict(r["saved"]), "weights": r["weights"], "lora": r["lora"]}
print(json.dumps(out))
"""


@pytest.mark.parametrize("model", ["small", "hunyuan-small"])
def test_meta_count_is_what_a_real_cpu_forward_saves(model):
    """On the CPU, PyTorch's SDPA runs its fused flash kernel by itself, so a real forward saves what the meta count
    (with attention substituted by that kernel) says, tensor for tensor; HunyuanVideo's boolean mask is passed to the
    kernel as an additive one, a few bytes more per block."""
    proc = subprocess.run(
        [sys.executable, "-c", COUNT, model], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    m, r = (bench_memory.Saved(**{k: c[k] for k in ("blocks", "inputs", "other")}) for c in counts.values())
    assert len(m.blocks) == len(r.blocks) > 1 and m.inputs == r.inputs
    if model == "small":
        assert m == r
    else:
        assert m.full == pytest.approx(r.full, rel=1e-3)
    # checkpointing keeps the block inputs and one block's tensors: less than the whole, more than any one block
    assert max(m.blocks) < m.checkpointed < m.full
    assert (
        counts["meta"]["weights"] == counts["cpu"]["weights"] > 0
        and counts["meta"]["lora"] == counts["cpu"]["lora"] > 0
    )


def test_the_table_prints_a_row_per_case(capsys):
    assert bench_memory.main(["--model", "small", "--frames", "9", "--height", "64", "--width", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small |")]
    assert len(rows) == 1 and rows[0].count("|") == 8 and "| 48 |" in rows[0]
