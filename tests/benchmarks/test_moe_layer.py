"""benchmarks/moe_layer.py on one tiny point: fastft's expert LoRA (both GEMM paths) agrees with PEFT's
target_parameters LoRA, saves less for backward than PEFT (which keeps W + s·B·A of every expert), and the DoRA
benchmark runs without a peer (PEFT refuses DoRA on experts)."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # benchmarks/ is a top-level folder of the repository, not installed

from benchmarks import moe_layer, suite  # noqa: E402

TINY = {("cpu", "quick"): (dict(hidden=32, intermediate=16, experts=8, top_k=2, tokens=24, rank=4, dtype="float32"),
                           dict(experts=[8]))}


def test_tiny_moe_point(tmp_path):
    outcome = suite.run(["--quick", "--repeats", "1", "--no-progress", "--no-render", "--out", str(tmp_path)],
                        benchmarks=moe_layer.suite_benchmarks(TINY))
    assert outcome.failures == []
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    figures = [r for r in rows if r["metric"] not in ("skipped", "failed")]

    def value(op, provider, metric, mode, backend=None):
        found = [float(r["p50"]) for r in figures if (r["op"], r["provider"], r["metric"], r["mode"]) ==
                 (op, provider, metric, mode) and (backend is None or r["backend"] == backend)]
        assert len(found) == 1, (op, provider, metric, mode, backend)
        return found[0]

    for backend in ("torch", "grouped"):
        assert value("moe_lora", "fastft", "max_rel_diff", "step", backend) < 1e-5  # against PEFT
        assert value("moe_lora", "fastft", "saved_for_backward", "forward", backend) < \
            value("moe_lora", "peft", "saved_for_backward", "forward")
        assert math.isfinite(value("moe_dora", "fastft", "time", "step", backend))
    assert any(r["op"] == "moe_dora" and r["provider"] == "peft" and r["metric"] == "skipped" for r in rows)
