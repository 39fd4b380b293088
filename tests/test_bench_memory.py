"""scripts/bench_memory.py counts a step's activations on the meta device: the count must be what a real run saves."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT
from trainer.perf import presets

spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "scripts/bench_memory.py")
bench_memory = sys.modules["bench_memory"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_memory)
SIZE = (9, 64, 64)  # frames, height, width


@pytest.mark.parametrize("model", ["small", "hunyuan-small"])
def test_meta_count_is_what_a_real_cpu_forward_saves(model):
    """On the CPU, PyTorch's SDPA runs its fused flash kernel by itself, so a real forward saves what the meta count
    (with attention substituted by that kernel) says, tensor for tensor; HunyuanVideo's boolean mask is passed to the
    kernel as an additive one, a few bytes more per block."""
    preset = presets()[model]
    meta = bench_memory.measure(preset, *SIZE, "default", 4, "meta")
    real = bench_memory.measure(preset, *SIZE, "default", 4, "cpu", fused=False)
    m, r = meta["saved"], real["saved"]
    assert len(m.blocks) == len(r.blocks) > 1 and m.inputs == r.inputs
    if model == "small":
        assert m == r
    else:
        assert m.full == pytest.approx(r.full, rel=1e-3)
    # checkpointing keeps the block inputs and one block's tensors: less than the whole, more than any one block
    assert max(m.blocks) < m.checkpointed < m.full
    assert meta["weights"] == real["weights"] > 0 and meta["lora"] == real["lora"] > 0


def test_the_table_prints_a_row_per_case(capsys):
    assert bench_memory.main(["--model", "small", "--frames", "9", "--height", "64", "--width", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small |")]
    assert len(rows) == 1 and rows[0].count("|") == 8 and "| 48 |" in rows[0]
