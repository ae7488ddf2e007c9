"""The third-party and compiled peers of the benchmark suite: each listed as run or "not run here" with a reason.

Nothing here asserts a timing: only which providers a case yields and the rows their skips leave. Shapes tiny.
"""

import pytest
import torch

from helpers import bench_context, subjects_by_provider

from benchmarks import harness, linear_ce, qat_step, records, s2ft_step, suite
from benchmarks.harness import Skipped, Subject




S2FT_POINT = dict(tokens=8, hidden=16, intermediate=24, ffn_ratio=0.25, dtype="float32")


def test_s2ft_layer_has_the_plain_compiled_and_shira_peers():
    subjects = subjects_by_provider(s2ft_step.layer_subjects(S2FT_POINT, bench_context()))
    assert {"fastft", "lora", "pytorch", "torch.compile", "peft-shira", "frozen"} <= set(subjects)
    # --quick does not compile: the compiled peer is a skipped row that says how to get it
    assert isinstance(subjects["torch.compile"], Skipped) and "--compile" in subjects["torch.compile"].reason
    assert isinstance(subjects["pytorch"], Subject) and subjects["pytorch"].role == "peer"
    if harness.installed("peft"):
        assert isinstance(subjects["peft-shira"], Subject)


def test_the_plain_s2ft_peer_computes_the_layer_and_only_the_slice_gradient():
    subjects = subjects_by_provider(s2ft_step.layer_subjects(S2FT_POINT, bench_context()))
    fastft, plain = subjects["fastft"], subjects["pytorch"]
    outputs = []
    for subject in (fastft, plain):
        subject.drop_grads()
        with subject.context():
            y = subject.forward()
            y.backward(subject.grad_output)
        outputs.append((y.detach().clone(), [g.grad.clone() for g in subject.grads]))
    (y0, g0), (y1, g1) = outputs
    torch.testing.assert_close(y0, y1)
    assert [g.shape for g in g0] == [g.shape for g in g1]  # dx and the slice's gradient, nothing more
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_the_s2ft_compiled_peer_is_built_with_compile(monkeypatch):
    monkeypatch.setattr(harness, "compiler_available", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # no inductor run: the wiring only
    subjects = subjects_by_provider(s2ft_step.layer_subjects(S2FT_POINT, bench_context(quick=False, compile=True)))
    compiled = subjects["torch.compile"]
    assert isinstance(compiled, Subject) and compiled.backend == "inductor" and compiled.role == "peer"


def test_a_missing_shira_is_a_skipped_row_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(harness, "installed", lambda name: name != "peft")
    subjects = subjects_by_provider(s2ft_step.layer_subjects(S2FT_POINT, bench_context()))
    assert isinstance(subjects["peft-shira"], Skipped) and "peft is not installed" in subjects["peft-shira"].reason


QAT_POINT = dict(hidden=32, intermediate=64, layers=1, heads=4, vocab=64, batch=1, seq=8, rank=2, dtype="float32")


def test_qat_step_has_the_torchao_peer_or_says_why_not(monkeypatch):
    subjects = subjects_by_provider(qat_step.suite_subjects(QAT_POINT, bench_context()))
    assert {"lora", "qat+lora", "torchao+peft"} <= set(subjects)
    peer = subjects["torchao+peft"]
    if harness.installed("torchao") and harness.installed("peft"):
        assert isinstance(peer, Subject) and peer.role == "peer"
        loss = peer.forward()
        loss.backward()
        assert torch.isfinite(loss) and peer.grads and all(g.grad is not None for g in peer.grads)
        # only the LoRA factors train; the fake-quantized linears are in place of the decoder's
        assert all(p.ndim == 2 for p in peer.grads) and len(peer.grads) == 2 * len(qat_step.TORCHAO_TARGETS)
    monkeypatch.setattr(harness, "installed", lambda name: name != "torchao")
    peer = subjects_by_provider(qat_step.suite_subjects(QAT_POINT, bench_context()))["torchao+peft"]
    assert isinstance(peer, Skipped) and "torchao is not installed" in peer.reason


def test_liger_is_listed_not_run_here_on_a_cpu_and_cce_is_listed():
    h, W, _, shifted = linear_ce.make_inputs(8, 16, 32, torch.float32)
    grads = [h]
    liger = linear_ce._liger(bench_context(), h, W, shifted, grads)
    assert isinstance(liger, Skipped) and "not run here" in liger.reason and "GPU" in liger.reason
    cce = linear_ce._cce(bench_context(), h, W, shifted, grads)
    assert isinstance(cce, Skipped)  # --quick: its torch_compile implementation compiles
    assert "--compile" in cce.reason or "not installed" in cce.reason


def test_cce_runs_its_torch_compile_implementation_on_a_cpu_with_compile(monkeypatch):
    if not harness.installed("cut_cross_entropy"):
        pytest.skip("cut-cross-entropy is not installed (pip install cut-cross-entropy)")
    h, W, _, shifted = linear_ce.make_inputs(8, 16, 32, torch.float32)
    cce = linear_ce._cce(bench_context(quick=False, compile=True), h, W, shifted, [h])
    assert isinstance(cce, Subject) and (cce.provider, cce.backend) == ("cce", "torch_compile")
    # its FLOPs are counted with the compiled function run eagerly (fullgraph refuses the FLOP counter's mode)
    assert cce.flops_context is not None and cce.backward_alone is False  # compiled backward: no retained graph
    with cce.flops_context():
        assert torch.compiler.is_compiling() is False


def test_every_skipped_peer_becomes_a_row_with_its_reason(tmp_path):
    benchmarks = s2ft_step.suite_benchmarks({("cpu", "quick"): (S2FT_POINT, dict(ffn_ratio=[0.25]))})[:1]
    outcome = suite.run(["--quick", "--repeats", "1", "--no-progress", "--no-render", "--out", str(tmp_path)],
                        benchmarks=benchmarks)
    assert outcome.failures == []
    skipped = [r for r in outcome.rows if r.metric == "skipped"]
    assert any(r.provider == "torch.compile" and "--compile" in r.note for r in skipped)
    timed = {r.provider for r in outcome.rows if r.metric == "time"}
    assert {"fastft", "lora", "pytorch", "frozen"} <= timed


def _fake_benchmarks():
    """Three benchmarks of three cases each (never run: --list), named like the suite's."""
    from benchmarks.harness import Benchmark, Case

    def family(name, key, values):
        return Benchmark(name, lambda ctx: [Case(name, {key: v}, (key,), lambda ctx: [], estimate_s=lambda ctx: 1.0)
                                            for v in values], name)

    return [family("lora", "hidden", [8, 16, 32]), family("host_overhead", "tokens", [1, 8, 64]),
            family("e2e-lora", "setup", ["a", "b", "c"])]


def test_full_keeps_the_subset_and_lists_what_it_leaves_out(tmp_path, capsys):
    outcome = suite.run(["--full", "--list", "--out", str(tmp_path)], benchmarks=_fake_benchmarks())
    text = capsys.readouterr().out
    assert "full-size subset (--full)" in text
    listed = [line.split()[1:3] for line in text.splitlines() if line.startswith("  ")]
    assert listed == [["lora", "hidden=8"], ["host_overhead", "tokens=1"], ["host_overhead", "tokens=64"]]
    left_out = [r for r in outcome.rows if r.metric == "skipped"]
    assert [r.op for r in left_out] == ["e2e-lora"] and suite.NOT_IN_SUBSET in left_out[0].note


def test_full_and_quick_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        suite.run(["--full", "--quick", "--list", "--out", str(tmp_path)], benchmarks=_fake_benchmarks())


@pytest.mark.parametrize("load, says", [(6.0, "**A shared machine.**"), (1.9, "**A quiet machine.**")])
def test_the_results_page_of_a_full_subset_run_says_what_it_covers_and_how_busy_the_machine_was(load, says):
    """More runnable processes than the benchmark's own threads (+1) is a shared machine; otherwise quiet."""
    from benchmarks import results_page

    env = records.Environment("cpu", 2, "t", "tr", "f", "run-1", processor="Test CPU (2 cores)", sweep="full",
                              command="python -m benchmarks --full")

    def row(op, metric="time", note="", p50=1e-3):
        r = env.row(load_start=load, op=op, provider="fastft", backend="torch", role="fastft", mode="step",
                    metric=metric, unit="s" if metric == "time" else "", x_name="tokens", x_value="8",
                    p50=p50 if metric == "time" else None, p20=p50 if metric == "time" else None,
                    p80=p50 if metric == "time" else None, config="tokens=8", note=note)
        values = {k: getattr(r, k) for k in records.FIELDS}
        values["load_avg"] = load  # the row records this machine's load now: pin it
        return values

    text = results_page.page([row("lora"), row("e2e-lora", "skipped", f"e2e-lora: {suite.NOT_IN_SUBSET}")])
    assert "**Coverage.**" in text and "left out: e2e-lora" in text
    assert says in text
    assert ("**A shared machine.**" in text) != ("**A quiet machine.**" in text)


def test_the_results_page_states_the_conditions_of_each_run_it_combines(tmp_path):
    from benchmarks import results_page

    rows = []
    for run, command in (("run-1", "python -m benchmarks --full"), ("run-2", "python -m benchmarks --full --only x")):
        env = records.Environment("cpu", 2, "t", "tr", "f", run, processor="Test CPU (2 cores)", sweep="full",
                                  command=command)
        r = env.row(load_start=1.0, op=f"op-{run}", provider="fastft", backend="torch", role="fastft", mode="step",
                    metric="time", unit="s", x_name="tokens", x_value="8", p50=1e-3, p20=1e-3, p80=1e-3,
                    config="tokens=8", note="")
        rows.append(r)
    csv_path = tmp_path / "results.csv"
    records.CsvWriter(csv_path).append(rows)
    out = tmp_path / "results.md"
    assert results_page.main([str(csv_path), "--run", "run-1,run-2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "reproduce: python -m benchmarks --full\n" in text and "reproduce: python -m benchmarks --full --only x" in text
    assert "run-1, run-2" in text


def test_the_compiled_hadamard_peer_is_differentiable(monkeypatch):
    """Its compiled peer is the dense rotation: fastft's O(d log d) reference writes with out=, which autograd
    (and so torch.compile of a forward + backward) refuses."""
    from benchmarks import csrc_ops

    monkeypatch.setattr(harness, "compiler_available", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the wiring, run eagerly
    subjects = csrc_ops._suite_subjects("hadamard_transform", dict(d=16, tokens=4, dtype="float32"),
                                        bench_context(quick=False, compile=True))
    compiled = subjects_by_provider(subjects)["torch.compile"]
    assert isinstance(compiled, Subject)
    compiled.forward().backward(compiled.grad_output)
    assert compiled.grads[0].grad is not None


def test_host_overhead_on_a_cpu_is_the_threads_cpu_time_per_call_interleaved():
    from benchmarks import host_overhead

    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    samples = host_overhead.thread_time_interleaved(calls, repeats=4, warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4}
    assert len(order) == 2 * 5 * host_overhead.CALLS_PER_SAMPLE and all(t >= 0 for v in samples.values() for t in v)
    # rounds rotate: the second round starts with b
    assert order[host_overhead.CALLS_PER_SAMPLE * 2] == "b"
    measured = host_overhead.run_method("lora", 16, 2, bench_context())
    times = [m for m in measured if m.metric == "time"]
    assert times and all("thread CPU time" in m.note for m in times)
    assert torch.get_num_threads() >= 1


def test_a_re_run_replaces_the_figures_of_an_op_and_its_failure_stays_listed():
    from benchmarks import results_page

    rows = [dict(op="a", run_id="r1", metric="failed"), dict(op="a", run_id="r2", metric="time"),
            dict(op="b", run_id="r1", metric="time"), dict(op="b", run_id="r2", metric="time"),
            dict(op="c", run_id="r1", metric="skipped"), dict(op="c", run_id="r2", metric="time"),
            dict(op="d", run_id="r1", metric="time")]
    kept = [(r["op"], r["run_id"], r["metric"]) for r in results_page.latest_figures(rows)]
    assert kept == [("a", "r1", "failed"), ("a", "r2", "time"), ("b", "r2", "time"), ("c", "r2", "time"),
                    ("d", "r1", "time")]


def test_a_peer_specific_explanation_comes_before_its_ops():
    from benchmarks import sanity

    shira = sanity._explain("s2ft", "floor", [dict(provider="peft-shira", load_start=None, load_avg=None)])
    lora = sanity._explain("s2ft", "floor", [dict(provider="lora", load_start=None, load_avg=None)])
    assert "SHiRA" in shira and "LoRA (the peer)" in lora
