"""``python -m benchmarks``: every op and method of fastft against its peers, speed and memory, CSV and plots.

    python -m benchmarks                    # the full sweep (prints its expected duration first)
    python -m benchmarks --quick            # small shapes, a few minutes on a 2-core CPU
    python -m benchmarks --full             # full-size shapes, a subset of the cases (about 10 min on a quiet 2-core CPU)
    python -m benchmarks --only lora,qlora  # some benchmarks (names or tags: layer, e2e); --skip likewise
    python -m benchmarks --list             # what would run, with estimated durations; runs nothing
    python -m benchmarks --out DIR          # results.csv (appended), summary.md and plots/ (default bench-results/)
    python -m benchmarks --strict           # exit 1 on a sanity warning that nothing explains
    python -m benchmarks.lora_layer ...     # one module's benchmarks, with the same options

This module owns the run, the CSV rows, the sanity checks and the rendering of every benchmark (the options
are parsed in ``benchmarks.cli``, the console output in ``benchmarks.console``); a benchmark module only
declares its cases and how to run one (``benchmarks.harness``).

Each benchmark module lists its cases through ``suite_benchmarks()`` (see ``benchmarks.harness``); the
modules are in :data:`SUITE_MODULES`. A provider that is not installed or cannot run here is skipped with
a note; a case that raises is reported as FAILED with its error and the run goes on (the exit status is
then 1). Rows are appended to the CSV as each case ends, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from . import allocator, harness
from .harness import Benchmark, Case, Context, Measurement
from .records import CsvWriter, Environment, Row, format_config, load_average
# the command line and the console output live in their own modules; their names stay reachable from here
from .cli import DEFAULT_OUT, FULL_TIMING, QUICK_TIMING, command_line, make_context, parse_args  # noqa: F401
from .console import Progress, _duration, _fmt, _label, format_case  # noqa: F401

# Modules whose ``suite_benchmarks()`` make up the suite. To add a benchmark module: give it a
# ``suite_benchmarks()`` returning harness.Benchmark objects and append its name here.
SUITE_MODULES = (
    "benchmarks.lora_layer",
    "benchmarks.dora_layer",
    "benchmarks.linear_ce",
    "benchmarks.hadamard",
    "benchmarks.csrc_ops",
    "benchmarks.s2ft_step",
    "benchmarks.sparse_step",
    "benchmarks.qat_step",
    "benchmarks.partial_backprop",
    "benchmarks.host_overhead",
    "benchmarks.e2e",
    "benchmarks.moe_layer",
    "benchmarks.variants_layer",
)

# ``--full``: full-size shapes and timing (as the full sweep) for a subset of the cases, chosen so that a run takes
# about 4 minutes on a quiet 2-core CPU (3.2 min measured on 2026-12-07 with an empty inductor cache; the whole sweep
# takes hours there). Per benchmark: None =
# its first case (the smallest full-size point), a dict = the cases whose config has those values. Every other
# benchmark gets one "skipped" row saying it is not in the subset, so the results page states what it covers.
FULL_SUBSET: dict[str, dict | None] = {
    "lora": None, "qlora": None, "dora": None, "qdora": None,
    "linear_ce": None, "fake_quant_weight": dict(d=4096, dtype="float32"),
    "hadamard": None, "rotate_quantize": None, "s2ft": dict(tokens=256),
    "sparse": None,
    "moe_lora": dict(dtype="bfloat16"), "moe_dora": dict(dtype="bfloat16"),  # where its torch.compile peer runs
    "host_overhead": dict(tokens=None),  # None: see FULL_HOST_TOKENS
    "loldu": None, "corda": None, "selective_lora": None, "lofit": None, "dsee": None, "qgoft": None,
}
FULL_HOST_TOKENS = (1, 64)
NOT_IN_SUBSET = "not in the --full subset (about 4 minutes on a quiet 2-core CPU); python -m benchmarks runs every case"


@dataclass
class Outcome:
    """What one run produced: its rows, skipped notes, failures, the output paths."""

    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    summary_path: Path | None = None
    plots: list[Path] = field(default_factory=list)
    warnings: list = field(default_factory=list)  # sanity.Warning of the run
    expected_s: float = 0.0
    elapsed_s: float = 0.0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# ----------------------------------------------------------------------------------- collecting
def collect(modules: Iterable[str] = SUITE_MODULES) -> tuple[list[Benchmark], list[tuple[str, str]]]:
    """The benchmarks of every suite module, and (module, error) for each module that failed to load."""
    import importlib

    benchmarks, broken = [], []
    for name in modules:
        try:
            benchmarks.extend(importlib.import_module(name).suite_benchmarks())
        except Exception as error:  # a broken module is reported, the others still run
            broken.append((name, _describe(error)))
    return benchmarks, broken


def select(benchmarks: list[Benchmark], only: list[str], skip: list[str]) -> list[Benchmark]:
    """Benchmarks named (or tagged) in ``only`` (all when empty), minus those in ``skip``."""
    known = {b.name for b in benchmarks} | {t for b in benchmarks for t in b.tags}
    unknown = [name for name in [*only, *skip] if name not in known]
    if unknown:
        raise SystemExit(
            f"--only/--skip: unknown benchmark(s) {unknown}; choose from {sorted(b.name for b in benchmarks)} "
            f"or the tags {sorted({t for b in benchmarks for t in b.tags})}"
        )
    matches = lambda b, names: b.name in names or any(t in names for t in b.tags)  # noqa: E731
    return [b for b in benchmarks if (not only or matches(b, only)) and not matches(b, skip)]


def _describe(error: BaseException) -> str:
    """``Type: message`` plus where it was raised: the innermost frame outside installed libraries."""
    import sysconfig

    frames = traceback.extract_tb(error.__traceback__)
    library_dirs = {sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")}
    ours = [f for f in frames if "site-packages" not in f.filename
            and not any(f.filename.startswith(d) for d in library_dirs)]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if where is not None:
        text += f" (at {Path(where.filename).name}:{where.lineno} in {where.name})"
    return text


# ----------------------------------------------------------------------------------- rows
def case_rows(case: Case, measurements: Iterable[Measurement], env: Environment,
              load_start: float | None = None) -> list[Row]:
    """The CSV rows of a case: one per measurement and sweep (or per curve point)."""
    rows = []
    config = format_config(case.config)
    if case.own_process and env.allocator != allocator.SYSTEM:
        env = dataclasses.replace(env, allocator=f"{allocator.SYSTEM} (measured in a process of its own)")
    for m in measurements:
        points = [m.x] if m.x is not None else [(name, case.config.get(name, "")) for name in case.x_names]
        for x_name, x_value in points:
            rows.append(env.row(load_start=load_start, op=case.op, provider=m.provider, backend=m.backend, role=m.role, mode=m.mode,
                                metric=m.metric, unit=m.unit, x_name=x_name, x_value=str(x_value), p50=m.p50,
                                p20=m.p20, p80=m.p80, config=config, note=m.note))
    return rows


def status_row(op: str, metric: str, note: str, env: Environment, case: Case | None = None,
               provider: str = "-") -> Row:
    """A "skipped" or "failed" row (no figure; the note says why)."""
    x_name = case.x_names[0] if case is not None and case.x_names else "-"
    x_value = str(case.config.get(x_name, "-")) if case is not None else "-"
    config = format_config(case.config) if case is not None else ""
    return env.row(op=op, provider=provider, backend="-", role="-", mode="-", metric=metric, unit="", x_name=x_name,
                   x_value=x_value, p50=None, p20=None, p80=None, config=config, note=note)


# ----------------------------------------------------------------------------------- running
def plan(benchmarks: list[Benchmark], ctx: Context, outcome: Outcome) -> list[tuple[Benchmark, Case]]:
    """The cases to run; benchmarks missing a package or failing to list their cases are recorded."""
    cases = []
    for benchmark in benchmarks:
        missing = [p for p in benchmark.requires if not harness.installed(p)]
        if missing:
            note = harness.missing_note(missing[0], f"benchmark {benchmark.name!r}")
            outcome.note(note)
            outcome.rows.append(status_row(benchmark.name, "skipped", note, ctx.env))
            continue
        try:
            cases += [(benchmark, case) for case in benchmark.cases(ctx)]
        except Exception as error:
            text = f"{benchmark.name}: listing its cases failed: {_describe(error)}"
            outcome.failures.append(text)
            outcome.rows.append(status_row(benchmark.name, "failed", text, ctx.env))
    return cases


def full_subset(cases: list[tuple[Benchmark, Case]], ctx: Context,
                subset: dict[str, dict | None] | None = None) -> tuple[list[tuple[Benchmark, Case]], list[Row]]:
    """The cases of ``--full`` (see :data:`FULL_SUBSET`), and a skipped row per benchmark left out."""
    subset = FULL_SUBSET if subset is None else subset
    kept, left_out = [], []
    for name in dict.fromkeys(b.name for b, _ in cases):
        mine = [(b, c) for b, c in cases if b.name == name]
        if name not in subset:
            left_out.append(status_row(name, "skipped", f"{name}: {NOT_IN_SUBSET}", ctx.env))
            continue
        wanted = subset[name]
        if wanted is None:
            kept.append(mine[0])
            continue
        for benchmark, case in mine:
            if name == "host_overhead" and case.config.get("tokens") not in FULL_HOST_TOKENS:
                continue
            if all(value is None or case.config.get(key) == value for key, value in wanted.items()):
                kept.append((benchmark, case))
    return kept, left_out


def run(argv: list[str] | None = None, benchmarks: list[Benchmark] | None = None,
        prog: str = "python -m benchmarks") -> Outcome:
    """Run the suite (``benchmarks`` replaces the collected ones; tests use it); returns the outcome."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog, __doc__)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = make_context(args)
    outcome = Outcome()
    out_dir = Path(args.out)
    writer = CsvWriter(out_dir / "results.csv")
    writer.check()
    if benchmarks is None:
        benchmarks, broken = collect()
        for module, error in broken:
            text = f"{module}: could not be loaded: {error}"
            outcome.failures.append(text)
            outcome.rows.append(status_row(module.rsplit(".", 1)[-1], "failed", text, ctx.env))
    selected = select(benchmarks, args.only, args.skip)
    cases = plan(selected, ctx, outcome)
    if args.full:
        cases, left_out = full_subset(cases, ctx)
        outcome.rows += left_out
        if left_out:
            outcome.note(f"--full: {', '.join(r.op for r in left_out)}: {NOT_IN_SUBSET}")

    ctx.gemm_flops_per_s = harness.calibrate_gemm(ctx.device)
    ctx.contention = 1.0 if ctx.on_gpu else harness.contention()
    if ctx.on_gpu:
        dtypes = sorted({str(c.config["dtype"]) for _, c in cases if str(c.config.get("dtype")) in harness.DTYPES})
        try:
            ctx.peaks = harness.measure_peaks(ctx.device, dtypes or ["bfloat16"])
        except Exception as error:
            outcome.note(f"roofline estimates skipped: measuring the device's peaks failed: {_describe(error)}")
    estimates = [max(0.0, c.estimate_s(ctx)) for _, c in cases]
    render_s = 0.0 if args.no_render else 0.5 * len(cases) * ctx.contention  # a plot or two per case, roughly
    outcome.expected_s = sum(estimates) + render_s

    env = ctx.env
    load = load_average()
    sweep_name = "QUICK CHECK: small shapes, not for publishing" if ctx.quick else (
        "full-size subset (--full)" if args.full else "full")
    print(f"fastft benchmarks ({sweep_name} sweep) "
          f"on {env.device} ({env.processor}), {env.threads} threads, 1-min load average {load if load is not None else 'n/a'}; torch {env.torch}, "
          f"triton {env.triton}, fastft {env.fastft}")
    if ctx.peaks is not None:
        print(f"roofline: {ctx.peaks.how} (estimates are labelled as such)")
    print(f"{len(cases)} cases in {len(selected)} benchmarks ({', '.join(b.name for b in selected) or 'none'}); "
          f"expected duration about {_duration(outcome.expected_s)} (estimated from a float32 GEMM at "
          f"{ctx.gemm_flops_per_s / 1e9:.0f} GFLOP/s on this machine now"
          + (f", fixed costs scaled by the load: {ctx.contention:.1f} runnable processes per core)" if ctx.contention > 1 else ")"))
    for note in outcome.notes:
        print(f"note: {note}")
    if args.list:
        for (benchmark, case), estimate in zip(cases, estimates):
            print(f"  {benchmark.name:<12} {case.label}  ~{_duration(estimate)}")
        return outcome

    writer.append(outcome.rows)
    started = time.perf_counter()
    progress = Progress(len(cases), enabled=not args.no_progress)
    memory = contextlib.ExitStack()
    if args.allocator == "kept":
        memory.enter_context(allocator.freed_memory_kept(ctx.device))
    try:
        for benchmark, case in cases:
            elapsed = time.perf_counter() - started
            if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
                note = f"not run: --max-minutes {args.max_minutes:g} reached"
                rows = [status_row(case.op, "skipped", f"{case.label}: {note}", env, case)]
                outcome.note(f"cases not run: --max-minutes {args.max_minutes:g} reached")
            else:
                progress.start(case.label)
                load_start = load_average()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        measurements = case.run(ctx)
                    rows = case_rows(case, measurements, env, load_start)
                    progress.write(format_case(case, measurements))
                    for m in measurements:
                        if m.metric == "skipped":
                            outcome.note(m.note)
                except Exception as error:
                    text = f"{case.label}: {_describe(error)}"
                    outcome.failures.append(text)
                    rows = [status_row(case.op, "failed", text, env, case)]
                    progress.write(f"{case.label}\n  FAILED: {_describe(error)}")
            writer.append(rows)
            outcome.rows += rows
            progress.advance()
    finally:
        progress.close()
        memory.close()
    outcome.elapsed_s = time.perf_counter() - started
    outcome.csv_path = writer.path
    from . import sanity

    outcome.warnings = sanity.check([_as_dict(r) for r in outcome.rows])
    if args.strict:
        for w in outcome.warnings:
            if not w.explanation:
                outcome.failures.append(f"--strict: sanity warning {w.text()}")

    if not args.no_render:
        from . import render

        try:
            result = render.render(writer.path, out_dir, run_id=env.run_id)
            outcome.summary_path, outcome.plots = result.summary_path, result.plots
            for note in result.notes:
                outcome.note(note)
        except Exception as error:
            outcome.failures.append(f"rendering the plots and summary failed: {_describe(error)}")
    _print_end(outcome, load)
    return outcome


def _as_dict(row: Row) -> dict:
    from dataclasses import asdict

    return asdict(row)


def _print_end(outcome: Outcome, load_at_start: float | None) -> None:
    load = load_average()
    print()
    print(f"done in {_duration(outcome.elapsed_s)} (expected about {_duration(outcome.expected_s)}); 1-min load "
          f"average {load_at_start if load_at_start is not None else 'n/a'} at the start, "
          f"{load if load is not None else 'n/a'} at the end")
    if outcome.csv_path is not None:
        print(f"rows appended to {outcome.csv_path}")
    if outcome.summary_path is not None:
        print(f"summary: {outcome.summary_path}; {len(outcome.plots)} plots in {outcome.summary_path.parent / 'plots'}")
    for note in outcome.notes:
        print(f"skipped: {note}")
    if outcome.warnings:
        explained = sum(1 for w in outcome.warnings if w.explanation)
        print(f"{len(outcome.warnings)} sanity warnings ({explained} explained; drawn under their figures):")
        for w in outcome.warnings:
            print(f"WARNING {w.text()}")
    for failure in outcome.failures:
        print(f"FAILED: {failure}")
    if outcome.failures:
        print(f"{len(outcome.failures)} FAILED (see above and the summary); the other cases ran.")


def main(argv: list[str] | None = None, benchmarks: list[Benchmark] | None = None,
         prog: str = "python -m benchmarks") -> int:
    """Run the suite; exit status 1 when a case failed (after everything else ran; with ``--strict`` also on
    an unexplained sanity warning), else 0."""
    outcome = run(argv, benchmarks, prog)
    return 1 if outcome.failures else 0


def main_module(module: str, benchmarks: list[Benchmark]) -> int:
    """``python -m benchmarks.<module>``: the suite's command line over that module's benchmarks alone."""
    return main(None, benchmarks, prog=f"python -m benchmarks.{module}")
