"""Timing helpers shared by the demo and the benchmarks (re-exported by :mod:`fastft.measure`).

``time_interleaved({name: fn}, repeats, warmup)``
    Wall-clock time of each provider, measured in one process with the providers interleaved
    round-robin (so drifts in clock speed, cache and memory state hit all of them alike). The first
    ``warmup`` rounds are discarded. CPU: ``time.perf_counter`` around one call; the intra-op thread
    count (``torch.get_num_threads()``) is recorded with the result. CUDA: the device is synchronised
    before starting and before stopping the clock. Returns the median and the 20th / 80th
    percentiles per provider. Never put a threshold on these numbers in a test.

``time_do_bench({name: fn}, rounds, warmup_ms, rep_ms)``
    The GPU counterpart: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache
    flushed before each call, its own time-based warm-up discarded) called for each provider in turn,
    round-robin over ``rounds`` rounds (rotated order, as above); the samples of all rounds are pooled
    into the median and the 20th / 80th percentiles.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

@dataclass(frozen=True)
class Timing:
    """Seconds per call of one provider: median and 20th / 80th percentiles of the timed rounds."""

    median_s: float
    p20_s: float
    p80_s: float
    repeats: int
    warmup: int
    threads: int
    device: str
    samples_s: tuple[float, ...] = field(repr=False)
    method: str = "perf_counter"  # or "do_bench" (time_do_bench; then ``warmup`` is milliseconds per call)

    def __str__(self) -> str:
        return (
            f"{self.median_s * 1e3:.2f} ms (p20 {self.p20_s * 1e3:.2f}, p80 {self.p80_s * 1e3:.2f}; "
            f"{self.repeats} runs, {self.device}, {self.threads} threads)"
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def time_interleaved(
    providers: Mapping[str, Callable[[], Any]],
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, Timing]:
    """Time each provider ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Round ``i`` calls every provider once, in the given order rotated by ``i`` (so no provider always
    runs first). Returns ``{name: Timing}`` in the order of ``providers``.
    """
    if not providers:
        raise ValueError("time_interleaved needs at least one provider")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_interleaved: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    names = list(providers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if on_cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            providers[name]()
            if on_cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {
        name: timing_from_samples(samples[name], warmup=warmup, device=str(device))
        for name in names
    }


def timing_from_samples(samples_s: Iterable[float], warmup: int = 0, device: str = "cpu",
                        threads: int | None = None, method: str = "perf_counter") -> Timing:
    """A :class:`Timing` (median, p20, p80) of seconds already measured, in the order they were taken."""
    samples = tuple(float(s) for s in samples_s)
    if not samples:
        raise ValueError("timing_from_samples needs at least one sample")
    values = sorted(samples)
    return Timing(
        median_s=statistics.median(values),
        p20_s=_percentile(values, 20),
        p80_s=_percentile(values, 80),
        repeats=len(samples),
        warmup=warmup,
        threads=torch.get_num_threads() if threads is None else threads,
        device=device,
        samples_s=samples,
        method=method,
    )


def compare_timings(a: Timing, b: Timing, a_name: str = "a", b_name: str = "b") -> str:
    """One honest sentence on ``a`` against ``b``.

    When the p20–p80 ranges of the two overlap the difference is inside the run-to-run spread: "no
    measurable difference". Otherwise the ratio of the medians, and which one is faster.
    """
    if a.p20_s <= b.p80_s and b.p20_s <= a.p80_s:
        return (f"no measurable difference between {a_name} and {b_name} "
                f"(their p20-p80 ranges overlap; medians {a.median_s / b.median_s:.2f}x)")
    faster, slower = (a_name, b_name) if a.median_s < b.median_s else (b_name, a_name)
    ratio = max(a.median_s, b.median_s) / min(a.median_s, b.median_s)
    return f"{faster} is {ratio:.2f}x faster than {slower} (median; p20-p80 ranges do not overlap)"


def time_do_bench(
    providers: Mapping[str, Callable[[], Any]],
    rounds: int = 3,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    do_bench: Callable[..., Any] | None = None,
) -> dict[str, Timing]:
    """GPU timing: ``triton.testing.do_bench`` for each provider, interleaved over ``rounds`` rounds.

    Round ``i`` benchmarks every provider once (``warmup_ms`` of warm-up, then ``rep_ms`` of timed calls),
    in the given order rotated by ``i``; all timed samples of a provider are pooled. ``do_bench`` may be
    replaced (tests). Returns ``{name: Timing}`` in the order of ``providers`` (``method="do_bench"``).
    """
    if not providers:
        raise ValueError("time_do_bench needs at least one provider")
    if rounds < 1 or warmup_ms < 0 or rep_ms < 1:
        raise ValueError(f"time_do_bench: rounds and rep_ms must be >= 1, warmup_ms >= 0; got {rounds}, {rep_ms}, {warmup_ms}")
    if do_bench is None:
        from triton.testing import do_bench
    names = list(providers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times_ms = do_bench(providers[name], warmup=warmup_ms, rep=rep_ms, return_mode="all")
            samples[name].extend(float(ms) / 1e3 for ms in times_ms)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cuda"
    results = {}
    for name in names:
        values = sorted(samples[name])
        results[name] = Timing(
            median_s=statistics.median(values),
            p20_s=_percentile(values, 20),
            p80_s=_percentile(values, 80),
            repeats=len(values),
            warmup=warmup_ms,
            threads=torch.get_num_threads(),
            device=device,
            samples_s=tuple(samples[name]),
            method="do_bench",
        )
    return results
