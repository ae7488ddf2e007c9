"""The one measurement procedure every layer-like op shares: :func:`measure_subjects` (warm-up, agreement,
saved bytes, peak memory, FLOPs, interleaved timing re-measured when its halves disagree, roofline
estimates) and :func:`layer_case`, the :class:`~benchmarks.protocol.Case` built on it. Reached through
``benchmarks.harness``, which re-exports every name; see its docstring for what is recorded.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import torch

from fastft import measure
from .protocol import Case, Context, Measurement, Peaks, Skipped, Subject


def max_rel_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """max over the tensors of max|ours - theirs| / max|theirs| (the output only if the gradients don't pair up)."""
    if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
        ours, theirs = ours[:1], theirs[:1]
    worst = 0.0
    for a, b in zip(ours, theirs):
        scale = b.float().abs().max().item()
        diff = (a.float() - b.float()).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# The first case of a process runs 10-30x slower for its first dozen calls on a CPU (measured here on 2 cores:
# a 256×512×512 linear's forward + backward took 675 ms, then 30-60 ms for ten calls, then 2 ms): the intra-op
# thread pool starting, oneDNN/MKL building its kernels for the shapes, glibc growing the heap and faulting
# its pages in. One or two warm-up rounds do not cover that, and the first case is a sweep's base point,
# which every panel of the sweep shares: issue 19's "rank 16 -> 64 makes everything 30x faster" was this.
# So every subject is stepped for a minimum time before anything is measured, longer in a fresh process.
WARM_UP_S = (1.0, 0.1)  # seconds of warm-up steps per subject: the first case of a process, the others
WARM_UP_CALLS = (2, 50)  # at least, at most
_process_warm: set[str] = set()


def warm_up(steps: Sequence[Callable[[], Any]], ctx: "Context") -> None:
    """Call each step until it ran ``WARM_UP_S`` seconds (at least / at most ``WARM_UP_CALLS`` calls);
    the first time on a device in this process, ``WARM_UP_S[0]`` (see the note above)."""
    import time

    first = ctx.device.type not in _process_warm
    budget = WARM_UP_S[0] if first else WARM_UP_S[1]
    for step in steps:
        start, calls = time.perf_counter(), 0
        while calls < WARM_UP_CALLS[0] or (time.perf_counter() - start < budget and calls < WARM_UP_CALLS[1]):
            step()
            calls += 1
            if ctx.on_gpu:
                torch.cuda.synchronize(ctx.device)
    _process_warm.add(ctx.device.type)


def time_calls(calls: dict[str, Callable[[], Any]], ctx: Context) -> dict[str, measure.Timing]:
    """Interleaved timing of ``calls`` on ``ctx``'s device (perf_counter on CPU, do_bench on CUDA)."""
    if ctx.on_gpu:
        return measure.time_do_bench(calls, rounds=ctx.rounds, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms)
    return measure.time_interleaved(calls, repeats=ctx.repeats, warmup=ctx.warmup, device=ctx.device)


def _timing_note(timing: measure.Timing, ctx: Context) -> str:
    if timing.method == "do_bench":
        return f"do_bench: {timing.repeats} timed calls over {ctx.rounds} interleaved rounds"
    return f"perf_counter: {timing.repeats} interleaved rounds after {timing.warmup} warm-up"


def halves_disagree(timing: measure.Timing) -> str | None:
    """Why the first and second half of ``timing``'s rounds disagree (None when they agree).

    The two halves are two repeated runs of the case, interleaved with the same peers: their medians must be
    within the spread of the whole (p20–p80, at least 5% of the median), or the case was disturbed while it
    ran (another process, a frequency change) and its figure is not to be trusted as is.
    """
    samples = list(timing.samples_s)
    if len(samples) < 4:
        return None
    import statistics

    half = len(samples) // 2
    first, second = statistics.median(samples[:half]), statistics.median(samples[half:])
    spread = max(timing.p80_s - timing.p20_s, 0.05 * timing.median_s)
    if abs(first - second) <= spread:
        return None
    return (f"the two halves of its rounds disagree: medians {first * 1e3:.3g} ms and {second * 1e3:.3g} ms, "
            f"spread {spread * 1e3:.3g} ms")


def time_checked(calls: dict[str, Callable[[], Any]], ctx: Context) -> tuple[dict[str, measure.Timing], dict[str, str]]:
    """:func:`time_calls`, then the same calls timed once more when a provider's halves disagree.

    Returns the timings kept and a note per provider: ``re-measured`` (the second run agreed with itself
    and replaces the first) or ``noisy: ...`` (both runs disagreed: the figure is kept and marked).
    """
    timings = time_calls(calls, ctx)
    notes: dict[str, str] = {}
    bad = {name: why for name, t in timings.items() if (why := halves_disagree(t))}
    if not bad or not ctx.remeasure:
        return timings, {name: f"noisy: {why}" for name, why in bad.items()}
    again = time_calls(calls, ctx)
    for name in timings:
        still = halves_disagree(again[name])
        if name in bad and still is None:
            timings[name] = again[name]
            notes[name] = f"re-measured: the first run's {bad[name]}; the second run agreed with itself"
        elif name in bad:
            timings[name] = again[name]
            notes[name] = f"noisy: measured twice and both runs' halves disagreed ({still})"
    return timings, notes


def measure_subjects(
    subjects: Iterable[Union[Subject, Skipped]],
    ctx: Context,
    min_bytes: Callable[[str], int] | None = None,
    dtype: str | None = None,
    agreement: bool = True,
) -> list[Measurement]:
    """Measure every subject alike (see the module docstring); Skipped entries become "skipped" rows.

    ``min_bytes(mode)``: the bytes the op must read and write at least in ``mode`` ("forward",
    "backward", "step"), for the GPU roofline estimate; ``dtype`` names the peak FLOP/s to use.
    ``agreement=False``: no ``max_rel_diff`` (the providers compute different things on purpose, e.g.
    QAT against plain LoRA, or different trainable sets).
    """
    subjects = list(subjects)
    out = [s.measurement() for s in subjects if isinstance(s, Skipped)]
    runnable = [s for s in subjects if isinstance(s, Subject)]
    if not runnable:
        return out
    labels = [s.label for s in runnable]
    if len(set(labels)) != len(labels):
        raise ValueError(f"subjects must have distinct labels, got {labels}")
    with_backward = all(s.has_backward for s in runnable)
    modes = ("forward", "backward", "step") if with_backward else ("forward",)

    warm_up([s.step_fn() for s in runnable], ctx)  # lazy initialisation, first allocations, compilation

    reference = next((s for s in runnable if s.role == "peer"), None)
    if reference is not None and agreement:
        expected = reference.results()
        for subject in runnable:
            if subject.role == "fastft":
                diff = max_rel_diff(subject.results(), expected)
                out.append(Measurement(subject.provider, subject.backend, subject.role, "step", "max_rel_diff", "rel",
                                       diff, note=f"max over output and gradients of max|fastft - {reference.label}| / "
                                                  f"max|{reference.label}|"))

    peak_metric = "peak_allocated" if ctx.on_gpu else "peak_live"
    fastft_flops: dict[str, int] = {}
    for subject in runnable:
        row = lambda mode, metric, unit, value, note="": Measurement(  # noqa: E731
            subject.provider, subject.backend, subject.role, mode, metric, unit, value, note=note)
        forward = subject.forward_fn()
        if subject.has_backward:
            outputs = []
            saved = measure.saved_bytes(lambda: outputs.append(forward()), parameters=subject.parameters)
            note = ""
            if subject.kept_bytes is not None:
                saved += subject.kept_bytes(outputs[0])
                note = "autograd's saved tensors plus what the op keeps on its graph node for backward"
            del outputs
            out.append(row("forward", "saved_for_backward", "bytes", saved, note))
        out.append(row("step", peak_metric, "bytes", measure.peak_live_bytes(subject.step_fn(), ctx.device)))
        counted = {"forward": measure.flops(subject._in_context(subject.forward, flops=True))}
        if subject.has_backward:
            output = subject._in_context(subject.forward, flops=True)()
            counted["backward"] = measure.flops(subject._in_context(lambda: subject._backward_of(output), flops=True))
            counted["step"] = counted["forward"] + counted["backward"]
            subject.drop_grads()
            del output
        for mode, value in counted.items():
            out.append(row(mode, "flops", "flop", value))
        if subject.role == "fastft" and not fastft_flops:
            fastft_flops = counted

    for mode in modes:  # each mode's callables built just before it is timed (backward holds graphs)
        if mode == "forward":
            calls = {s.label: s.forward_fn() for s in runnable}
        elif mode == "backward":
            calls = {s.label: s.backward_fn() for s in runnable if s.backward_alone}
        else:
            calls = {s.label: s.step_fn() for s in runnable}
        timings, noisy = time_checked(calls, ctx)
        del calls
        for subject in runnable:
            if subject.label not in timings:
                continue
            t = timings[subject.label]
            note = _timing_note(t, ctx) + (f"; {noisy[subject.label]}" if subject.label in noisy else "")
            out.append(Measurement(subject.provider, subject.backend, subject.role, mode, "time", "s",
                                   t.median_s, t.p20_s, t.p80_s, note=note))
            subject.drop_grads()

    if ctx.peaks is not None and min_bytes is not None and fastft_flops:
        out += roofline_estimates(fastft_flops, min_bytes, ctx.peaks, dtype or "float32")
    return out


def roofline_estimates(flops_by_mode: dict[str, int], min_bytes: Callable[[str], int], peaks: Peaks,
                       dtype: str) -> list[Measurement]:
    """``max(FLOPs / peak, bytes / bandwidth)`` per mode: a lower bound on the time, labelled an estimate."""
    peak = peaks.flops_per_s.get(dtype)
    if peak is None:
        return []
    out = []
    for mode, flops in flops_by_mode.items():
        nbytes = min_bytes(mode)
        compute_s, memory_s = flops / peak, nbytes / peaks.bytes_per_s
        bound = "compute" if compute_s >= memory_s else "memory"
        note = (f"estimate, not a measurement: max(FLOPs / peak, bytes / bandwidth) = max({flops:.3g} / {peak:.3g}, "
                f"{nbytes:.3g} / {peaks.bytes_per_s:.3g}); {bound}-bound; {peaks.how}")
        out.append(Measurement("roofline", "estimate", "estimate", mode, "time", "s", max(compute_s, memory_s), note=note))
        out.append(Measurement("roofline", "estimate", "estimate", mode, "min_bytes", "bytes", nbytes,
                               note="bytes the op must read and write at least"))
    return out

def layer_estimate(step_flops: float, providers: int, ctx: Context, slowdown: float = 1.0) -> float:
    """Seconds :func:`measure_subjects` should take: ``providers`` subjects of ``step_flops`` per step.

    CPU: warm-up, agreement, memory and FLOP passes (about 7 steps) plus three timed modes of
    ``warmup + repeats`` rounds (forward + backward + step ≈ 2 steps a round), at the calibrated GEMM
    speed times ``slowdown``, plus the profiler's fixed cost. GPU: do_bench's time budget.
    """
    if ctx.on_gpu:
        return providers * 3 * ctx.rounds * (ctx.warmup_ms + ctx.rep_ms + 20) / 1e3 + 2.0
    steps = providers * (7 + 2 * (ctx.warmup + ctx.repeats))
    return steps * step_flops * slowdown / ctx.gemm_flops_per_s + 0.4 * providers * ctx.contention


def layer_case(
    op: str,
    config: dict[str, Any],
    x_names: tuple[str, ...],
    build: Callable[[dict[str, Any], Context], list[Union[Subject, Skipped]]],
    min_bytes: Callable[[dict[str, Any], str], int] | None = None,
    estimate_s: Callable[[Context], float] | None = None,
    agreement: bool = True,
) -> Case:
    """A :class:`Case` that builds the subjects of ``config`` and measures them with :func:`measure_subjects`.

    ``build`` may also return ``(subjects, extra)``: ``extra`` measurements (e.g. an analytic count) are
    appended to what :func:`measure_subjects` records.
    """

    def run(ctx: Context) -> list[Measurement]:
        built = build(config, ctx)
        subjects, extra = built if isinstance(built, tuple) else (built, [])
        bytes_of = None if min_bytes is None else (lambda mode: min_bytes(config, mode))
        return measure_subjects(subjects, ctx, min_bytes=bytes_of, dtype=config.get("dtype"),
                                agreement=agreement) + list(extra)

    case = Case(op, dict(config), tuple(x_names), run)
    if estimate_s is not None:
        case.estimate_s = estimate_s
    return case
