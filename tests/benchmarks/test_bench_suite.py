"""The benchmark suite's harness (``python -m benchmarks``): rows, plots, skips, failures, end-to-end variants.

Nothing here asserts a timing: only the shape of the records, exact byte counts, and that skips and
failures are reported. Shapes are tiny so the whole file runs in seconds.
"""
import csv
import datetime
import dataclasses
import math

import pytest
import torch
from fastft import dispatch

from fastft import measure

from benchmarks import e2e, harness, lora_layer, records, render, sanity, suite
from benchmarks import csrc_ops, dora_layer, hadamard, linear_ce, partial_backprop, qat_step, s2ft_step

TINY = {("cpu", "quick"): (dict(hidden=32, tokens=16, rank=4, dtype="float32"), dict(hidden=[32, 48]))}
FLOAT32 = 4


def tiny_lora():
    lora, qlora = lora_layer.suite_benchmarks(sweeps=TINY, qlora_sweeps=TINY)
    return lora, qlora


def run_suite(tmp_path, benchmarks, *extra):
    return suite.run(["--quick", "--repeats", "2", "--no-progress", "--out", str(tmp_path), *extra], benchmarks=benchmarks)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def test_quick_run_of_one_op_writes_well_formed_rows_a_summary_and_plots(tmp_path):
    lora, _ = tiny_lora()
    outcome = run_suite(tmp_path, [lora])
    assert outcome.failures == []

    header, rows = read_csv(tmp_path / "results.csv")
    assert tuple(header) == records.FIELDS
    figures = [r for r in rows if r["metric"] not in ("skipped", "failed")]
    assert {r["op"] for r in rows} == {"lora"}
    assert {(r["provider"], r["role"]) for r in figures} == {
        ("fastft", "fastft"), ("peft", "peer"), ("pytorch", "peer"), ("frozen", "floor")}
    assert {r["backend"] for r in figures if r["provider"] == "fastft"} == {"torch"}
    assert {r["x_name"] for r in rows} == {"hidden"} and {r["x_value"] for r in rows} == {"32", "48"}
    assert len({r["run_id"] for r in rows}) == 1
    for r in figures:
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert math.isfinite(p50) and p20 <= p50 <= p80, r
        assert r["device"] == "cpu" and int(r["threads"]) == torch.get_num_threads()
        assert r["torch"] == torch.__version__ and r["fastft"] and r["triton"]
        datetime.datetime.fromisoformat(r["timestamp"])
        assert r["config"].startswith(f"hidden={r['x_value']} tokens=16 rank=4")
    for provider in ("fastft", "peft", "pytorch", "frozen"):
        for mode in ("forward", "backward", "step"):
            assert any(r["provider"] == provider and r["metric"] == "time" and r["mode"] == mode and r["unit"] == "s"
                       for r in figures), (provider, mode)

    def figure(provider, metric, hidden, mode):
        (row,) = [r for r in figures if (r["provider"], r["metric"], r["x_value"], r["mode"]) == (provider, metric, hidden, mode)]
        return float(row["p50"])

    # exact counts: fastft saves x and x·Aᵀ; the floor saves nothing; FLOPs of the step are the products
    for hidden in (32, 48):
        assert figure("fastft", "saved_for_backward", str(hidden), "forward") == (16 * hidden + 16 * 4) * FLOAT32
        assert figure("frozen", "saved_for_backward", str(hidden), "forward") == 0
        assert figure("frozen", "flops", str(hidden), "step") == 2 * 2 * 16 * hidden * hidden
        assert figure("fastft", "flops", str(hidden), "step") == figure("peft", "flops", str(hidden), "step")
        assert figure("fastft", "max_rel_diff", str(hidden), "step") < 1e-5
        assert figure("fastft", "peak_live", str(hidden), "step") > 0
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert {r["backend"] for r in skipped} == {"triton", "inductor"}
    assert all("interpreter" in r["note"] for r in skipped if r["backend"] == "triton")
    assert all("not run in --quick" in r["note"] for r in skipped if r["backend"] == "inductor")
    # every row states its conditions: processor, sweep, the command, the load at its case's start and end
    assert all(r["processor"] and r["sweep"] == "quick" and r["command"].startswith("python -m benchmarks --quick")
               and r["load_start"] != "" and r["load_avg"] != "" for r in rows)

    summary = (tmp_path / "summary.md").read_text()
    assert "## lora" in summary and "fastft[torch] / best peer" in summary and "time, step" in summary
    assert "## Skipped" in summary and "## FAILED" not in summary
    assert "QUICK CHECK" in summary and "reproduce: python -m benchmarks --quick" in summary
    assert rows[0]["processor"] in summary
    plot = tmp_path / "plots" / "lora-time.png"
    assert plot in outcome.plots and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_providers_are_skipped_with_a_note_not_an_error(tmp_path, monkeypatch, capsys):
    real_installed = harness.installed
    monkeypatch.setattr(harness, "installed", lambda name: name not in ("peft", "bitsandbytes") and real_installed(name))
    outcome = run_suite(tmp_path, list(tiny_lora()))
    out = capsys.readouterr().out
    assert outcome.failures == []

    _, rows = read_csv(tmp_path / "results.csv")
    assert not [r for r in rows if r["provider"] == "peft" and r["metric"] != "skipped"]
    peft_notes = {r["note"] for r in rows if r["provider"] == "peft" and r["metric"] == "skipped"}
    assert peft_notes == {'peft is not installed: the PEFT provider skipped (pip install -e ".[peft]" from the fastft checkout)'}
    assert {r["provider"] for r in rows if r["metric"] == "time"} == {"fastft", "pytorch", "frozen"}
    qlora = [r for r in rows if r["op"] == "qlora"]
    assert [r["metric"] for r in qlora] == ["skipped"] and "bitsandbytes is not installed" in qlora[0]["note"]
    assert "skipped: peft is not installed" in out and "skipped: bitsandbytes is not installed" in out
    summary = (tmp_path / "summary.md").read_text()
    assert "peft is not installed" in summary and "bitsandbytes is not installed" in summary


def _trivial_case(op, value):
    def run(ctx):
        return [harness.Measurement("fastft", "torch", "fastft", "step", "time", "s", value),
                harness.Measurement("peer", "eager", "peer", "step", "time", "s", 2 * value)]

    return harness.Case(op, {"size": 1}, ("size",), run, lambda ctx: 0.0)


def test_a_raising_benchmark_is_reported_failed_and_the_run_goes_on(tmp_path, capsys):
    def boom(ctx):
        raise RuntimeError("kaboom: the kernel exploded")

    broken = harness.Benchmark("broken", lambda ctx: [harness.Case("broken", {"size": 1}, ("size",), boom, lambda ctx: 0.0)])
    unlisted = harness.Benchmark("unlisted", lambda ctx: 1 / 0)
    fine = harness.Benchmark("fine", lambda ctx: [_trivial_case("fine", 0.001)])
    argv = ["--quick", "--no-progress", "--out", str(tmp_path)]
    assert suite.main(argv, benchmarks=[broken, unlisted, fine]) == 1
    out = capsys.readouterr().out
    assert "FAILED: broken size=1: RuntimeError: kaboom: the kernel exploded" in out
    assert "FAILED: unlisted: listing its cases failed: ZeroDivisionError" in out

    _, rows = read_csv(tmp_path / "results.csv")
    failed = {r["op"]: r["note"] for r in rows if r["metric"] == "failed"}
    assert set(failed) == {"broken", "unlisted"} and "kaboom" in failed["broken"]
    assert "(at test_bench_suite.py:" in failed["broken"] and "in boom)" in failed["broken"]  # where it was raised
    assert [r["provider"] for r in rows if r["op"] == "fine"] == ["fastft", "peer"]  # ran after the failure
    summary = (tmp_path / "summary.md").read_text()
    assert "## FAILED" in summary and "kaboom: the kernel exploded" in summary
    assert "0.50× (peer)" in summary


def test_summary_ratio_is_against_the_best_peer_never_a_floor_or_an_estimate():
    env = records.Environment("cpu", 2, "t", "tr", "f", "run-1")

    def row(provider, role, value, n=8):
        r = env.row(op="op", provider=provider, backend="torch" if role == "fastft" else "eager", role=role, mode="step",
                    metric="time", unit="s", x_name="n", x_value=str(n), p50=value, p20=value, p80=value, config=f"n={n}")
        return {k: getattr(r, k) for k in records.FIELDS}

    rows = [row("fastft", "fastft", 2e-3), row("peft", "peer", 4e-3), row("pytorch", "peer", 3e-3),
            row("frozen", "floor", 1e-3), row("roofline", "estimate", 0.5e-3)]
    single_point = render.summary_tables(rows)  # one point: a line per metric
    assert "| time (step, median) | 2 ms | 4 ms | 3 ms | 1 ms | 500 µs | 0.67× (pytorch) |" in single_point
    sweep = render.summary_tables(rows + [row("fastft", "fastft", 9.0, n=16), row("peft", "peer", 3.0, n=16)])
    assert "| n=8 | 2 ms | 4 ms | 3 ms | 1 ms | 500 µs | 0.67× (pytorch) |" in sweep
    assert "| n=16 | 9 s | 3 s | - | - | - | 3.00× (peft) |" in sweep
    assert "frozen (floor)" in sweep and "roofline (estimate)" in sweep


def test_selection_by_name_and_tag_and_unknown_names_are_an_error():
    lora, qlora = tiny_lora()
    benchmarks = [lora, qlora, harness.Benchmark("e2e-lora", lambda ctx: [], tags=("e2e", "lora"))]
    assert [b.name for b in suite.select(benchmarks, ["lora"], [])] == ["lora", "e2e-lora"]
    assert [b.name for b in suite.select(benchmarks, ["layer"], ["qlora"])] == ["lora"]
    with pytest.raises(SystemExit, match="unknown benchmark.*'dora'.*choose from"):
        suite.select(benchmarks, ["dora"], [])


def test_sweep_points_share_the_base_point_between_sweeps():
    points = harness.sweep_points(dict(h=1, r=2), dict(h=[1, 3], r=[2, 5]))
    assert points == [(dict(h=1, r=2), ("h", "r")), (dict(h=3, r=2), ("h",)), (dict(h=1, r=5), ("r",))]


def test_time_do_bench_interleaves_providers_and_pools_their_samples():
    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "all" and (warmup, rep) == (5, 20)
        calls.append(fn())
        return [1.0, 2.0, 3.0] if calls[-1] == "a" else [10.0]

    timings = measure.time_do_bench({"a": lambda: "a", "b": lambda: "b"}, rounds=3, warmup_ms=5, rep_ms=20,
                                    do_bench=fake_do_bench)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert timings["a"].method == "do_bench" and timings["a"].repeats == 9
    assert timings["a"].median_s == pytest.approx(2e-3) and timings["b"].median_s == pytest.approx(10e-3)


# ------------------------------------------------------------------------------------------- end to end
def tiny_setup():
    return e2e.E2ESetup(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128, words=16, seq_len=16,
                     batch=2, steps=3, rank=4, alpha=8)


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "qdora"])
def test_end_to_end_variants_train_to_the_same_losses(method):
    if method in ("qlora", "qdora"):
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes; install fastft[test]")
    pytest.importorskip("peft", reason="the peer variant is PEFT; install fastft[test]")
    results = {p: e2e.run_variant(method, p, tiny_setup(), torch.device("cpu"), torch.float32) for p in ("fastft", "peft")}
    ours, theirs = results["fastft"], results["peft"]
    assert len(ours["losses"]) == 3 and all(math.isfinite(v) for v in ours["losses"])
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-5)
    # r·(in + out) over q, k, v, o (64->64, 64->32 twice, 64->64) and gate, up, down (64->128 twice, 128->64)
    magnitudes = 64 + 32 + 32 + 64 + 128 + 128 + 64 if "dora" in method else 0  # DoRA: one per output feature
    assert ours["trainable_params"] == theirs["trainable_params"] == 4 * (128 + 96 + 96 + 128 + 192 * 3) + magnitudes
    assert ours["backend"] == "torch" and theirs["backend"] == "-"
    assert ours["peak_rss"] >= ours["peak_rss_train"] > 0 and ours["rss_baseline"] > 0

    measurements = e2e.result_measurements(ours)
    metrics = {m.metric for m in measurements}
    assert {"time", "final_loss", "peak_rss", "peak_rss_train", "rss_baseline", "loss"} <= metrics
    curve = [m for m in measurements if m.metric == "loss"]
    assert [m.x for m in curve] == [("step", 1), ("step", 2), ("step", 3)]


@pytest.mark.parametrize("method", ["qat", "s2ft"])
def test_end_to_end_methods_without_a_peft_peer_train(method):
    # the data's batches differ in difficulty (step 3 is harder than step 1 for every method), so compare
    # the first and last three steps of ten
    setup = dataclasses.replace(tiny_setup(), steps=10)
    result = e2e.run_variant(method, "fastft", setup, torch.device("cpu"), torch.float32)
    lora = 4 * (128 + 96 + 96 + 128 + 192 * 3)  # the LoRA peer's trainable count (see above)
    losses = result["losses"]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.5 * 3  # at least 0.5 nats lower on average
    assert result["backend"] != "-"  # fastft modules ran
    if method == "qat":
        assert result["trainable_params"] == lora  # LoRA's adapters over the fake-quantized base
    else:
        assert abs(result["trainable_params"] - lora) <= 64  # one FFN channel of the 64-wide layer


def test_a_failing_end_to_end_process_raises_with_its_error():
    with pytest.raises(RuntimeError, match="exited with status 2"):
        e2e.run_in_subprocess("lora", "no-such-provider", "quick", torch.device("cpu"), 1, timeout_s=120)


def test_list_runs_nothing_and_max_minutes_records_the_cases_it_did_not_start(tmp_path, capsys):
    fine = harness.Benchmark("fine", lambda ctx: [_trivial_case("fine", 0.001), _trivial_case("fine", 0.002)])
    listed = suite.run(["--quick", "--list", "--out", str(tmp_path)], benchmarks=[fine])
    assert "2 cases in 1 benchmarks (fine); expected duration about" in capsys.readouterr().out
    assert listed.rows == [] and not (tmp_path / "results.csv").exists()

    outcome = suite.run(["--quick", "--no-progress", "--max-minutes", "0", "--out", str(tmp_path)], benchmarks=[fine])
    assert outcome.failures == []
    _, rows = read_csv(tmp_path / "results.csv")
    assert [r["metric"] for r in rows] == ["skipped", "skipped"]
    assert all("--max-minutes 0 reached" in r["note"] for r in rows)


# ------------------------------------------------------------------------------------------- every benchmark
NEW_BENCHMARKS = {"dora", "qdora", "linear_ce", "fake_quant_weight", "s2ft", "s2ft_step", "qat_step", "partial_backprop",
                  "hadamard", "rotate_quantize", "e2e-dora", "e2e-qdora", "e2e-qat", "e2e-s2ft",
                  "sparse", "e2e-sparse"}


def _context(device: str, quick: bool) -> harness.Context:
    return harness.Context(device=torch.device(device), quick=quick,
                           env=records.Environment(device, 2, "t", "tr", "f", "run-1"))


def test_every_registered_benchmark_lists_its_cases_on_every_device_and_sweep():
    benchmarks, broken = suite.collect()
    assert broken == []
    names = [b.name for b in benchmarks]
    assert len(names) == len(set(names)) and NEW_BENCHMARKS <= set(names)
    for device in ("cpu", "cuda"):  # listing runs nothing: no GPU is needed to list the CUDA sweeps
        for quick in (True, False):
            ctx = _context(device, quick)
            for benchmark in benchmarks:
                cases = benchmark.cases(ctx)
                assert cases, (benchmark.name, device, quick)
                labels = [c.label for c in cases]
                assert len(labels) == len(set(labels)), labels
                for case in cases:
                    assert set(case.x_names) <= set(case.config) | {"setup"}
                    assert math.isfinite(case.estimate_s(ctx)) and case.estimate_s(ctx) >= 0


TINY_ONE = {("cpu", "quick"): (TINY[("cpu", "quick")][0], dict(hidden=[32]))}
TINY_SUITE = [
    dora_layer.suite_benchmarks(sweeps=TINY_ONE, qdora_sweeps=TINY_ONE),
    linear_ce.suite_benchmarks({("cpu", "quick"): (dict(tokens=24, hidden=32, vocab=80, lm_head="frozen", dtype="float32"),
                                                   dict(lm_head=["trainable"]))}),
    hadamard.suite_benchmarks({("cpu", "quick"): (dict(d=128, dtype="float32"), dict(d=[128]))}),
    csrc_ops.suite_benchmarks({("cpu", "quick"): (dict(d=96, tokens=8, dtype="float32"), dict(d=[96]))}),
    s2ft_step.suite_benchmarks(
        {("cpu", "quick"): (dict(tokens=16, hidden=32, intermediate=48, ffn_ratio=0.25, dtype="float32"),
                            dict(ffn_ratio=[0.25]))},
        {("cpu", "quick"): (dict(hidden=64, intermediate=128, layers=1, heads=4, seq=16, batch=1, vocab=128,
                                 attn_ratio=0.25, ffn_ratio=0.125), dict(seq=[16]))}),
    qat_step.suite_benchmarks({("cpu", "quick"): (dict(hidden=64, intermediate=128, layers=1, heads=4, vocab=128,
                                                       batch=1, seq=16, rank=4, dtype="float32"), dict(seq=[16]))}),
    partial_backprop.suite_benchmarks({("cpu", "quick"): (dict(hidden=64, intermediate=128, layers=2, heads=4,
                                                               vocab=128, seq=16, batch=1), dict(seq=[16]))}),
]


def test_a_tiny_case_of_each_new_benchmark_yields_well_formed_rows(tmp_path):
    benchmarks = [b for group in TINY_SUITE for b in group]
    outcome = suite.run(["--quick", "--repeats", "1", "--no-progress", "--no-render", "--out", str(tmp_path)],
                        benchmarks=benchmarks)
    assert outcome.failures == []
    header, rows = read_csv(tmp_path / "results.csv")
    assert tuple(header) == records.FIELDS
    figures = [r for r in rows if r["metric"] not in ("skipped", "failed")]
    ops = {"dora", "qdora", "linear_ce", "fake_quant_weight", "s2ft", "s2ft_step", "qat_step", "partial_backprop",
           "hadamard_transform", "rotate_quantize"}
    assert {r["op"] for r in figures} == ops
    for r in figures:
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert math.isfinite(p50) and p20 <= p50 <= p80, r
    for op in ops:
        mine = [r for r in figures if r["op"] == op]
        assert any(r["role"] == "fastft" and r["metric"] == "time" for r in mine), op
        assert any(r["role"] in ("peer", "floor") and r["metric"] == "time" for r in mine), op
        assert any(r["metric"] == "flops" for r in mine), op

    def value(op, provider, metric, mode, backend="torch"):
        (row,) = [r for r in figures if (r["op"], r["provider"], r["metric"], r["mode"]) == (op, provider, metric, mode)
                  and (r["role"] != "fastft" or r["backend"] == backend)]
        return float(row["p50"])

    assert value("dora", "fastft", "max_rel_diff", "step") < 1e-4  # against PEFT DoRA
    assert value("dora", "fastft", "flops", "step") < value("dora", "peft", "flops", "step")
    assert value("linear_ce", "fastft", "flops", "step") == value("linear_ce", "transformers", "flops", "step")
    # the fused loss keeps dh (24×32) and dW (80×32) float32 gradients from its forward for the backward
    assert value("linear_ce", "fastft", "saved_for_backward", "forward") == (24 * 32 + 80 * 32) * FLOAT32
    assert not [r for r in figures if r["op"] == "linear_ce" and r["provider"] == "fastft" and r["mode"] == "backward"
                and r["metric"] == "time"]  # its backward cannot run twice on one graph: not timed alone
    # the transform's backward is the inverse transform: the 12×12 factor of 96 = 12·8 in both directions
    assert value("hadamard_transform", "fastft", "flops", "step") == 2 * (2 * 8 * 96 * 12)
    if "cpp" in dispatch.op_backends("hadamard_transform") and dispatch.backend_for("hadamard_transform", "cpu") == "cpp":
        assert value("hadamard_transform", "fastft", "max_rel_diff", "step", backend="cpp") < 1e-5  # the C++ library
    for policy in ("layers", "half", "flops@0.5"):
        assert value("partial_backprop", policy, "flops_report", "backward") == \
            value("partial_backprop", policy, "flops", "backward")
    assert not [r for r in figures if r["metric"] == "max_rel_diff" and r["op"] in ("qat_step", "s2ft_step")]


def test_linear_ce_skips_a_path_that_would_not_fit_in_memory(monkeypatch):
    huge = dict(tokens=8192, hidden=4096, vocab=152064, lm_head="trainable", dtype="float32")
    monkeypatch.setattr(harness, "available_memory", lambda device: 24 * 2**30)
    why = linear_ce.memory_check("transformers", 8192, 4096, 152064, 4, True, None, torch.device("cpu"))
    assert why is not None and "needs about" in why and "24.00 GiB is available" in why
    assert linear_ce.memory_check("fastft", 8192, 4096, 152064, 4, True, None, torch.device("cpu")) is None
    monkeypatch.setattr(harness, "available_memory", lambda device: 2**30)  # nothing fits: both skipped, none built
    subjects = linear_ce.suite_subjects(huge, _context("cpu", False))
    assert [(type(s).__name__, s.provider) for s in subjects if s.backend != "triton"] == [
        ("Skipped", "fastft"), ("Skipped", "transformers")]


def test_end_to_end_methods_share_the_lora_variant_and_s2ft_matches_its_trainable_count(monkeypatch):
    build_base_model = e2e.build_base_model

    calls = []

    def fake_run(method, provider, setup_name, device, threads, timeout_s):
        calls.append((method, provider))
        return dict(provider=provider, backend="torch", losses=[3.0, 2.0], step_seconds=[0.1], rss_baseline=1,
                    peak_rss=3, peak_rss_train=2, peak_rss_was_reset=True, trainable_params=7)

    monkeypatch.setattr(e2e, "run_in_subprocess", fake_run)
    ctx = _context("cpu", True)
    cases = [c for b in e2e.suite_benchmarks() if b.name in ("e2e-lora", "e2e-qat", "e2e-s2ft") for c in b.cases(ctx)]
    assert [c.name.split(" (")[0] for c in cases] == ["e2e-lora fastft", "e2e-lora peft", "e2e-qat fastft",
                                                      "e2e-qat lora", "e2e-s2ft fastft", "e2e-s2ft lora"]
    assert [c.estimate_s(ctx) == 0 for c in cases] == [False, False, False, True, False, True]
    measured = [c.run(ctx) for c in cases]
    assert calls == [("lora", "fastft"), ("lora", "peft"), ("qat", "fastft"), ("s2ft", "fastft")]
    shared = [m for m in measured[3] if m.metric == "time"][0]
    assert shared.provider == "lora" and shared.role == "peer" and "e2e-lora fastft" in shared.note

    setup = e2e.setups()["quick"]
    model = build_base_model(setup)
    lora_count = sum(setup.rank * (m.in_features + m.out_features) for m in e2e.decoder_linears(model).values())
    report = __import__("fastft").patch(model, e2e.s2ft_config(model, setup))
    assert abs(report.trainable_params - lora_count) <= setup.hidden * setup.layers  # within one channel a layer


# ------------------------------------------------------------------------------------------- sanity checks
def _row(op="op", provider="fastft", role="fastft", mode="step", metric="time", x_name="tokens", x=8, p50=1e-3,
         spread=0.0, config=None, note="", load=0.5, sweep="full"):
    env = records.Environment("cpu", 2, "t", "tr", "f", "run-1", processor="Test CPU (2 cores)", sweep=sweep,
                              command="python -m benchmarks")
    r = env.row(load_start=load, op=op, provider=provider, backend="torch" if role == "fastft" else "eager", role=role,
                mode=mode, metric=metric, unit="s" if metric == "time" else "flop", x_name=x_name, x_value=str(x),
                p50=p50, p20=p50 * (1 - spread), p80=p50 * (1 + spread), config=config or f"{x_name}={x}", note=note)
    r = {k: getattr(r, k) for k in records.FIELDS}
    r["load_avg"] = load
    return r


def test_sanity_checks_flag_time_falling_with_work_steps_that_are_not_forward_plus_backward_noise_and_the_floor():
    rows = [_row(x=8, p50=20e-3), _row(x=64, p50=1e-3)]  # the base-point anomaly of issue 19
    (w,) = sanity.check(rows)
    assert w.check == "falls_with_work" and "tokens=8 20 ms → tokens=64 1 ms" in w.message and w.explanation is None
    assert not sanity.check([_row(x=8, p50=1.0e-3, spread=0.2), _row(x=64, p50=0.95e-3, spread=0.2)])  # within spread

    parts = [_row(mode="forward", p50=1e-3), _row(mode="backward", p50=1e-3), _row(mode="step", p50=7e-3)]
    (w,) = sanity.check(parts)
    assert w.check == "step_sum" and "3.50×" in w.message
    assert not sanity.check(parts[:2] + [_row(mode="step", p50=2.2e-3)])

    (w,) = sanity.check([_row(p50=1e-3, note="perf_counter; noisy: measured twice and both runs disagreed")])
    assert w.check == "noisy"

    floor = [_row(provider="frozen", role="floor", p50=1e-3), _row(provider="peft", role="peer", p50=3e-3),
             _row(provider="frozen", role="floor", metric="flops", p50=100.0),
             _row(provider="peft", role="peer", metric="flops", p50=110.0)]
    (w,) = sanity.check(floor)
    assert w.check == "floor" and w.provider == "peft" and "3.0× the floor" in w.message
    floor[3]["p50"] = 300.0  # three times the work: three times the time is allowed
    assert not sanity.check(floor)


def test_sanity_warnings_are_explained_by_load_or_a_known_cause_and_strict_fails_on_the_rest(tmp_path, capsys):
    (w,) = sanity.check([_row(x=8, p50=20e-3, load=5.0), _row(x=64, p50=1e-3, load=5.0)])
    assert "loaded while it ran (1-minute load average 5.0–5.0 on 2 cores)" in w.explanation
    (w,) = sanity.check([_row(op="linear_ce", mode=m, p50=v) for m, v in
                         (("forward", 1e-3), ("backward", 1e-3), ("step", 9e-3))])
    assert "computes its gradients in its forward" in w.explanation

    def falling(ctx):
        return [harness.Measurement("fastft", "torch", "fastft", "step", "time", "s", 9e-3 if ctx else 1e-3)]

    cases = lambda ctx: [harness.Case("odd", {"tokens": n}, ("tokens",),  # noqa: E731
                                      lambda ctx, n=n: [harness.Measurement("fastft", "torch", "fastft", "step", "time",
                                                                            "s", 1e-2 / n)], lambda ctx: 0.0)
                         for n in (1, 64)]
    odd = harness.Benchmark("odd", cases)
    argv = ["--quick", "--no-progress", "--out", str(tmp_path)]
    if sanity.load_explanation([{"load_avg": records.load_average(), "processor": records.processor_name()}]):
        pytest.skip("the machine is loaded: every warning is explained by the load, --strict has nothing to fail on")
    assert suite.main(argv, benchmarks=[odd]) == 0  # warned, not failed
    assert "WARNING [falls_with_work] odd step fastft[torch]" in capsys.readouterr().out
    assert suite.main(argv + ["--strict"], benchmarks=[odd]) == 1


def test_the_results_page_refuses_a_quick_run_and_states_the_conditions_of_a_full_one(tmp_path):
    from benchmarks import results_page

    with pytest.raises(ValueError, match="--quick run"):
        results_page.page([_row(sweep="quick")])
    rows = [_row(op="host-lora", x=1, p50=2e-4), _row(op="host-lora", provider="peft", role="peer", x=1, p50=1e-4),
            _row(op="lora", x=8, p50=1e-3)]
    text = results_page.page(rows)
    assert "Test CPU (2 cores)" in text and "reproduce: python -m benchmarks" in text and "run-1" in text
    assert "## Host overhead" in text and "2.00× (peft)" in text and "### lora" in text


def test_the_host_overhead_benchmark_times_fastft_its_peer_and_the_plain_layer(tmp_path):
    from benchmarks import host_overhead

    tiny = {("cpu", "quick"): (32, [1, 4])}
    outcome = suite.run(["--quick", "--no-progress", "--no-render", "--out", str(tmp_path)],
                        benchmarks=host_overhead.suite_benchmarks(tiny))
    assert outcome.failures == []
    _, rows = read_csv(tmp_path / "results.csv")
    times = [r for r in rows if r["metric"] == "time"]
    assert {r["op"] for r in times} == {f"host-{m}" for m in host_overhead.METHODS}
    for method, peer in (("lora", "peft"), ("dora", "peft"), ("s2ft", "peft-shira"), ("qat", "torchao")):
        providers = {r["provider"] for r in times if r["op"] == f"host-{method}"}
        assert {"fastft", "plain"} <= providers, method
        assert peer in providers or any(r["provider"] == peer and r["metric"] == "skipped" for r in rows), method
    assert {r["x_value"] for r in times} == {"1", "4"} and {r["mode"] for r in times} == {"forward", "step"}


def test_a_compiled_peer_runs_with_compile(tmp_path):
    if harness.compiler_available():
        pytest.skip(harness.compiler_available())
    lora, _ = lora_layer.suite_benchmarks(sweeps=TINY_ONE, qlora_sweeps=TINY_ONE)
    outcome = run_suite(tmp_path, [lora], "--compile", "--no-render")
    assert outcome.failures == []
    _, rows = read_csv(tmp_path / "results.csv")
    compiled = [r for r in rows if r["provider"] == "torch.compile"]
    assert {r["backend"] for r in compiled} == {"inductor"} and {r["role"] for r in compiled} == {"peer"}
    assert {r["mode"] for r in compiled if r["metric"] == "time"} == {"forward", "backward", "step"}


def test_a_benchmark_without_a_sweep_for_this_run_says_which_it_has():
    from helpers import bench_context

    sweeps = {("cpu", "quick"): (dict(n=1), dict(n=[1, 2]))}
    assert harness.sweep_of("toy", sweeps, bench_context(quick=True)) == sweeps[("cpu", "quick")]
    with pytest.raises(ValueError, match=r"toy: no sweep for \('cpu', 'full'\); known: \[\('cpu', 'quick'\)\]"):
        harness.sweep_of("toy", sweeps, bench_context(quick=False))
