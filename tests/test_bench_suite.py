"""The benchmark suite's harness (``python -m benchmarks``): rows, plots, skips, failures, end-to-end variants.

Nothing here asserts a timing: only the shape of the records, exact byte counts, and that skips and
failures are reported. Shapes are tiny so the whole file runs in seconds.
"""
import csv
import datetime
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # benchmarks/ is a top-level folder of the repository, not installed

from benchmarks import e2e, harness, lora_layer, measure, records, render, suite  # noqa: E402

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
    assert skipped and all(r["backend"] == "triton" and "interpreter" in r["note"] for r in skipped)

    summary = (tmp_path / "summary.md").read_text()
    assert "## lora" in summary and "fastft[torch] / best peer" in summary and "time, step" in summary
    assert "## Skipped" in summary and "## FAILED" not in summary
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
    assert peft_notes == {'peft is not installed: the PEFT provider skipped (pip install "fastft[peft]")'}
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
    from fastft.demo import DemoSetup

    return DemoSetup(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128, words=16, seq_len=16,
                     batch=2, steps=3, rank=4, alpha=8)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_end_to_end_variants_train_to_the_same_losses(method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes; install fastft[test]")
    pytest.importorskip("peft", reason="the peer variant is PEFT; install fastft[test]")
    results = {p: e2e.run_variant(method, p, tiny_setup(), torch.device("cpu"), torch.float32) for p in ("fastft", "peft")}
    ours, theirs = results["fastft"], results["peft"]
    assert len(ours["losses"]) == 3 and all(math.isfinite(v) for v in ours["losses"])
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-5)
    # r·(in + out) over q, k, v, o (64->64, 64->32 twice, 64->64) and gate, up, down (64->128 twice, 128->64)
    assert ours["trainable_params"] == theirs["trainable_params"] == 4 * (128 + 96 + 96 + 128 + 192 * 3)
    assert ours["backend"] == "torch" and theirs["backend"] == "-"
    assert ours["peak_rss"] >= ours["peak_rss_train"] > 0 and ours["rss_baseline"] > 0

    measurements = e2e.result_measurements(ours)
    metrics = {m.metric for m in measurements}
    assert {"time", "final_loss", "peak_rss", "peak_rss_train", "rss_baseline", "loss"} <= metrics
    curve = [m for m in measurements if m.metric == "loss"]
    assert [m.x for m in curve] == [("step", 1), ("step", 2), ("step", 3)]


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
