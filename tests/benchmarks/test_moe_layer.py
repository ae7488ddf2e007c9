"""benchmarks/moe_layer.py on one tiny point: fastft's expert LoRA (both GEMM paths) agrees with PEFT's
target_parameters LoRA, saves less for backward than PEFT (which keeps W + s·B·A of every expert), and the DoRA
benchmark runs without a peer (PEFT refuses DoRA on experts)."""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

import fastft

pytest.importorskip("transformers")
from helpers import bench_context

from benchmarks import moe_layer, suite

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


@pytest.mark.parametrize("dora", [False, True])
def test_the_compiled_peers_code_is_the_method(dora, monkeypatch):
    """experts_reference (what the torch.compile peer compiles) computes what fastft's experts layer computes:
    the same output and the same gradients of x and every adapter tensor (float32: torch._grouped_mm runs it
    eagerly). In bfloat16 it is built as a compiled peer; in float32 it is listed as not run (torch 2.13 compiles
    torch._grouped_mm for bfloat16 only)."""
    from benchmarks import harness, measuring

    point = dict(hidden=32, intermediate=16, experts=4, top_k=2, tokens=24, rank=8)
    monkeypatch.setattr(harness, "compiler_available", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the compiled peer's code, run eagerly
    ctx = bench_context(quick=False, compile=True)
    for dtype, runs in (("float32", False), ("bfloat16", True)):
        subjects = moe_layer.suite_subjects(dict(point, dtype=dtype), ctx, dora)
        compiled = next(s for s in subjects if s.provider == "torch.compile")
        assert isinstance(compiled, harness.Subject) == runs, compiled
        if not runs:
            assert "bfloat16" in compiled.reason
    base = moe_layer.suite_experts(point, torch.float32, torch.device("cpu"))
    holder = moe_layer.Holder(copy.deepcopy(base))
    fastft.patch(holder, fastft.LoRAConfig(r=8, alpha=16, targets=["experts.gate_up_proj", "experts.down_proj"],
                                           dora=dora))
    experts = holder.experts
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.params:
            getattr(experts, f"lora_B_{p}").normal_(std=0.1, generator=gen)
    x = torch.randn(24, 32, generator=gen, requires_grad=True)
    weights, index = torch.topk(torch.randn(24, 4, generator=gen).softmax(-1), 2)
    factors = {p: (getattr(experts, f"lora_A_{p}"), getattr(experts, f"lora_B_{p}")) for p in experts.params}
    magnitudes = {p: getattr(experts, f"lora_magnitude_{p}") for p in experts.params} if dora else None
    tensors = [x] + [t for p in experts.params for t in factors[p]] + list((magnitudes or {}).values())
    grad_y = torch.randn(24, 32, generator=gen)
    y_ours = holder(x, index, weights)
    y_theirs = moe_layer.experts_reference(x, index, weights, base, factors, experts.scale, magnitudes)
    ours = [y_ours.detach(), *torch.autograd.grad(y_ours, tensors, grad_y)]
    theirs = [y_theirs.detach(), *torch.autograd.grad(y_theirs, tensors, grad_y)]
    assert measuring.max_rel_diff(theirs, ours) < 1e-5
