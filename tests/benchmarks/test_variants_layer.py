"""benchmarks/variants_layer.py on tiny points: every method's case runs, and every provider it names produces
figures (time, saved bytes, peak live memory, FLOPs, trainable parameters) or a skipped row with its reason."""
from __future__ import annotations

import csv
import math
import os

import pytest
import torch

pytest.importorskip("peft")
from helpers import bench_context

from benchmarks import harness, measuring, suite, variants_layer

TINY = {("cpu", "quick"): (dict(hidden=64, tokens=24, dtype="float32"), dict(tokens=[24]))}

# provider -> expected outcome per method: "figures" (measured) or "skipped" (a row saying why)
EXPECTED = {
    "loldu": {"fastft-lora": "figures", "peft-lora": "figures", "fastft": "figures", "peft-loldu": "skipped"},
    "corda": {"fastft-lora": "figures", "peft-lora": "figures", "fastft": "figures", "peft-corda": "figures"},
    "selective_lora": {"fastft-lora": "figures", "peft-lora": "figures", "fastft": "figures",
                       "fastft-closed": "figures", "peft-selective_lora": "skipped"},
    "lofit": {"fastft-lora": "figures", "peft-lora": "figures", "fastft": "figures", "peft-lofit": "skipped"},
    "dsee": {"fastft-lora": "figures", "peft-lora": "figures", "fastft": "figures", "peft-dsee": "skipped"},
    "qgoft": {"fastft-lora": "figures", "peft-lora": "figures", "fastft": "figures", "peft-oft": "figures",
              "peft-boft": "figures"},
}
for providers in EXPECTED.values():
    providers["torch.compile"] = "skipped"  # --quick builds no compiled peer
FIGURES = [("time", "forward"), ("time", "backward"), ("time", "step"), ("saved_for_backward", "forward"),
           ("peak_live", "step"), ("flops", "step"), ("trainable_params", "step")]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    environment = dict(os.environ)
    outcome = suite.run(["--quick", "--repeats", "1", "--no-progress", "--no-render", "--device", "cpu",
                         "--out", str(out)], benchmarks=variants_layer.suite_benchmarks(TINY))
    assert outcome.failures == []
    # the run leaves the process environment as it found it (PEFT's BOFT sets CC/CXX=gcc when its CUDA build
    # fails; left set, every later C++ build in this process would use gcc for C++)
    assert dict(os.environ) == environment
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", variants_layer.METHODS)
def test_every_provider_has_figures_or_a_stated_skip(rows, method):
    mine = [r for r in rows if r["op"] == method]
    providers = {r["provider"] for r in mine}
    assert providers == set(EXPECTED[method]), providers
    for provider, outcome in EXPECTED[method].items():
        theirs = [r for r in mine if r["provider"] == provider]
        if outcome == "skipped":
            assert theirs and all(r["metric"] == "skipped" and r["note"] for r in theirs), theirs
            continue
        for metric, mode in FIGURES:
            found = [float(r["p50"]) for r in theirs if (r["metric"], r["mode"]) == (metric, mode)
                     and (r["role"] != "fastft" or r["backend"] == "torch")]
            assert len(found) == 1 and math.isfinite(found[0]) and found[0] >= 0, (provider, metric, mode, found)


def test_budgets_and_what_differs(rows):
    def value(method, provider, metric, mode="step"):
        found = [float(r["p50"]) for r in rows if (r["op"], r["provider"], r["metric"], r["mode"]) ==
                 (method, provider, metric, mode) and r["backend"] in ("torch", "eager", "-")]
        assert len(found) == 1, (method, provider, metric, found)
        return found[0]

    hidden, rank = 64, variants_layer.RANK
    assert value("loldu", "fastft-lora", "trainable_params") == 2 * hidden * rank
    assert value("loldu", "fastft", "trainable_params") == rank  # only the diagonal trains
    assert value("dsee", "fastft", "trainable_params") == 2 * hidden * rank + variants_layer.DSEE_SPARSE
    # a closed gate keeps nothing of the low-rank path for backward; LoFiT's offsets are a bias
    assert value("selective_lora", "fastft-closed", "saved_for_backward", "forward") < \
        value("selective_lora", "fastft", "saved_for_backward", "forward")
    assert value("lofit", "fastft", "saved_for_backward", "forward") == 0
    oft_note = [r["note"] for r in rows if r["op"] == "qgoft" and r["provider"] == "peft-oft"]
    assert oft_note and all("different method" in n for n in oft_note)


@pytest.mark.parametrize("method", variants_layer.METHODS)
def test_the_compiled_peers_code_is_the_method(method, monkeypatch):
    """Each method's plain-PyTorch formula (what the torch.compile peer compiles) computes what the fastft layer
    computes: the same output and the same gradients of x and of every trained tensor."""
    config = dict(hidden=128, tokens=24, dtype="float32")
    ctx = bench_context(quick=False, compile=True)
    monkeypatch.setattr(harness, "compiler_available", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the compiled peer's code, run eagerly
    subjects, _ = variants_layer.variant_subjects(method, config, ctx)
    compiled = next(s for s in subjects if s.provider == "torch.compile")
    fastft_layer = next(s for s in subjects if isinstance(s, harness.Subject) and s.provider == "fastft")
    assert isinstance(compiled, harness.Subject) and compiled.parameters is fastft_layer.parameters
    expected, got = fastft_layer.results(), compiled.results()
    assert len(expected) == len(got) == 1 + len(compiled.grads)
    assert all(g.shape == e.shape for e, g in zip(expected, got))
    # float32, the same products associated differently (LoLDU folds d into B first): the suite's agreement bound
    assert measuring.max_rel_diff(got, expected) < 1e-5
