"""The suite's plug-in protocol, and the one measurement procedure every layer-like op shares.

A benchmark module joins ``python -m benchmarks`` by defining ``suite_benchmarks()`` (a list of
:class:`Benchmark`) and being listed in ``benchmarks.suite.SUITE_MODULES``. A :class:`Benchmark` is a
named family (what ``--only`` selects) whose ``cases(ctx)`` returns the points to measure on this device
at this sweep size; a :class:`Case` is one point whose ``run(ctx)`` returns :class:`Measurement` s (the
suite stamps them into CSV rows). Most ops need only :func:`layer_case`: give it a function building one
:class:`Subject` per provider (fastft on each backend, PEFT, plain PyTorch, a floor) and it measures them
all alike, see :func:`measure_subjects`. A provider that cannot run here is a :class:`Skipped` entry
(it becomes a "skipped" row with the reason), never an error.

What :func:`measure_subjects` records, per subject (definitions in ``fastft.measure``):

* time of the forward (graph built), the backward alone (on a retained graph) and the step (forward +
  backward), all subjects interleaved in one process: CPU ``time.perf_counter`` (``--repeats`` timed
  rounds after ``--warmup`` rounds, threads recorded), GPU ``triton.testing.do_bench`` (rounds of
  time-based warm-up + timed calls, L2 flushed between calls);
* ``saved_for_backward``: bytes autograd keeps for backward (parameters excluded);
* CPU ``peak_live`` (peak bytes of tensors live at once during a step, from the profiler's allocator
  events) or GPU ``peak_allocated`` (``torch.cuda.max_memory_allocated`` over the step, minus what was
  allocated before);
* ``flops`` of forward, backward and step (FlopCounterMode; fastft counted on its reference backend,
  which computes the same products as its kernels);
* ``max_rel_diff``: how far fastft's output and gradients are from the first peer's (per tensor, the
  largest absolute difference over the peer's largest magnitude; the worst tensor);
* on a GPU, a roofline *estimate* per mode, when the case knows the bytes the op must move at least:
  ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``, with peaks measured on the device at the start.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Sequence, Union

import torch

from fastft import measure
from fastft.dispatch import use_backend as forced_backend  # the one copy of the context manager
from .records import Environment

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

INSTALL_HINTS = {
    "peft": 'pip install -e ".[peft]" from the fastft checkout',
    "bitsandbytes": 'pip install -e ".[qlora]" from the fastft checkout',
    "matplotlib": 'pip install -e ".[bench]" from the fastft checkout',
    "tqdm": 'pip install -e ".[bench]" from the fastft checkout',
}


# ----------------------------------------------------------------------------------- availability
def installed(package: str) -> bool:
    """Whether ``package`` can be imported here (the one check the suite makes; tests replace it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def missing_note(package: str, what: str) -> str:
    hint = INSTALL_HINTS.get(package, f"pip install {package}")
    return f"{package} is not installed: {what} skipped ({hint})"


def not_run_here(provider: str, backend: str, role: str, why: str) -> "Skipped":
    """A peer that exists but cannot run on this device (listed as "not run here", never dropped)."""
    return Skipped(provider, backend, role, f"{provider}: not run here: {why}")


def compiler_available() -> str | None:
    """None when torch.compile (inductor) can build code on the CPU here, else why not."""
    import shutil

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler on PATH (inductor compiles CPU code with one)"
    return None


COMPILE_SECONDS = 40.0  # a forward + backward compiled by inductor on 2 CPU cores (for duration estimates)


def compiled_peer(ctx: "Context", fn: Callable[..., Any], args: Sequence[Any], grad_output: torch.Tensor | None,
                  grads: Sequence[torch.Tensor], parameters: Any = (), what: str = "the op's PyTorch reference",
                  **kwargs) -> Union["Subject", "Skipped"]:
    """``torch.compile(fn)`` as a peer ("torch.compile", backend "inductor"): the strong, fair peer every op gets.

    ``fn(*args)`` is the op's plain PyTorch reference (autograd differentiates it; inductor compiles forward
    and backward). Not built in ``--quick`` (compiling one shape takes about a minute on 2 CPU cores) or where
    inductor cannot compile: a skipped row says which.
    """
    if device_type(ctx) == "cpu":
        missing = compiler_available()
        if missing:
            return not_run_here("torch.compile", "inductor", "peer", missing)
    if not ctx.compile:
        return Skipped("torch.compile", "inductor", "peer",
                       f"torch.compile of {what}: not run in --quick (compiling a shape takes about a minute on a "
                       "2-core CPU); the full sweep runs it (or pass --compile)")
    compiled = torch.compile(fn, dynamic=False)
    return Subject("torch.compile", "inductor", "peer", lambda: compiled(*args), grad_output, list(grads), parameters,
                   **kwargs)


def device_type(ctx: "Context") -> str:
    return ctx.device.type


def fastft_backends(op: str, device: torch.device) -> tuple[list[str], list["Skipped"]]:
    """The fastft backends that can time ``op`` on ``device`` here, and a Skipped entry for each other.

    Asks ``fastft.dispatch.backend_for`` with each backend registered for ``op`` forced. Triton on a CPU
    is never timed: there it runs only under the Triton interpreter (NumPy per program instance), a
    correctness tool.
    """
    from fastft import dispatch

    runnable, skipped = [], []
    for name in dispatch.op_backends(op):
        if name == "triton" and device.type == "cpu":
            skipped.append(Skipped("fastft", name, "fastft", "Triton runs on a CPU only under the Triton "
                                   "interpreter, a correctness tool: fastft[triton] is timed on CUDA only"))
            continue
        with forced_backend(name):
            try:
                dispatch.backend_for(op, device)
            except RuntimeError as error:
                skipped.append(Skipped("fastft", name, "fastft", f"fastft[{name}] cannot run here: {error}"))
                continue
        runnable.append(name)
    return runnable, skipped


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` now (CPU: the kernel's MemAvailable; CUDA: free device
    memory), or None when unknown. Benchmarks whose memory grows with the shape check against it."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------- protocol
@dataclass
class Measurement:
    """One figure of one provider; the suite turns it into CSV rows (see ``benchmarks.records``).

    ``x``: (x_name, x_value) for a figure that is a point of a curve (e.g. ("step", 3)); by default a
    figure belongs to every sweep of its case.
    """

    provider: str
    backend: str
    role: str
    mode: str
    metric: str
    unit: str
    p50: float | None
    p20: float | None = None
    p80: float | None = None
    note: str = ""
    x: tuple[str, Any] | None = None

    def __post_init__(self):
        if self.p50 is not None:
            self.p20 = self.p50 if self.p20 is None else self.p20
            self.p80 = self.p50 if self.p80 is None else self.p80


@dataclass
class Skipped:
    """A provider that cannot run here, and why (a "skipped" row; the run goes on)."""

    provider: str
    backend: str
    role: str
    reason: str

    def measurement(self) -> Measurement:
        return Measurement(self.provider, self.backend, self.role, "-", "skipped", "", None, note=self.reason)


@dataclass
class Peaks:
    """The device's peak FLOP/s per dtype and memory bandwidth (bytes/s), for roofline estimates."""

    flops_per_s: dict[str, float]
    bytes_per_s: float
    how: str


@dataclass
class Context:
    """What a case needs to know about the run: device, sweep size, timing settings, calibrations."""

    device: torch.device
    quick: bool
    env: Environment
    repeats: int = 10  # CPU: timed rounds
    warmup: int = 2  # CPU: untimed rounds first
    rounds: int = 3  # GPU: do_bench rounds per provider
    warmup_ms: int = 25  # GPU: do_bench warm-up per call
    rep_ms: int = 100  # GPU: do_bench timed milliseconds per call
    gemm_flops_per_s: float = 5e10  # this machine's matmul speed now (for duration estimates only)
    contention: float = 1.0  # 1-minute load average per core, at least 1 (scales fixed costs in estimates)
    peaks: Peaks | None = None  # GPU only
    compile: bool = True  # build torch.compile peers (off in --quick: compiling a shape takes a minute here)
    remeasure: bool = True  # time a mode again when its two halves disagree (see measure_subjects)

    @property
    def sweep(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    """One point of a benchmark: ``run(ctx)`` measures it; ``estimate_s(ctx)`` guesses how long that takes.

    ``config`` is the whole point (``{"hidden": 1024, "tokens": 512, "rank": 16, "dtype": "float32"}``);
    ``x_names`` the sweeps it belongs to (a base point shared by several sweeps is measured once and
    written once per sweep). ``config`` must not name the provider: rows of different providers at the
    same point are compared by their config.
    """

    op: str
    config: dict[str, Any]
    x_names: tuple[str, ...]
    run: Callable[[Context], list[Measurement]]
    estimate_s: Callable[[Context], float] = lambda ctx: 5.0
    name: str = ""  # shown in the progress instead of op + config (e.g. when a case is one provider)

    @property
    def label(self) -> str:
        return self.name or f"{self.op} " + " ".join(f"{k}={v}" for k, v in self.config.items())


@dataclass
class Benchmark:
    """A named family of cases: ``--only NAME`` (or one of ``tags``) selects it.

    ``requires``: packages without which no case can run (the benchmark is then skipped with a note).
    """

    name: str
    cases: Callable[[Context], list[Case]]
    description: str = ""
    tags: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()


def sweep_points(base: dict[str, Any], sweeps: dict[str, Sequence[Any]]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """One-at-a-time sweeps around ``base``: each variable takes its values while the others stay at base.

    Returns (point, x names it belongs to), each distinct point once, in order of first appearance.
    """
    points: dict[tuple, tuple[dict[str, Any], list[str]]] = {}
    for x_name, values in sweeps.items():
        if x_name not in base:
            raise ValueError(f"sweep variable {x_name!r} is not in the base point {sorted(base)}")
        for value in values:
            point = dict(base, **{x_name: value})
            key = tuple(point.items())
            points.setdefault(key, (point, []))[1].append(x_name)
    return [(point, tuple(names)) for point, names in points.values()]


# ----------------------------------------------------------------------------------- layer-like ops
@dataclass
class Subject:
    """One provider's implementation of an op at one point, ready to run.

    ``forward()`` runs the op with autograd recording and returns its output; the backward is
    ``output.backward(grad_output)`` (``grad_output`` None: the output is a scalar loss). ``grads``: the
    leaves (inputs, trainable parameters) whose gradients a step produces, dropped before every call and
    compared across providers in this order. ``parameters``: modules/tensors excluded from saved bytes.
    ``context`` is entered around every call (e.g. :func:`forced_backend`); ``flops_context`` around the
    FLOP count (default: ``context``). ``has_backward=False``: a forward-only op. ``backward_alone=False``:
    the backward cannot run twice on one graph (e.g. a fused loss that hands over gradients it computed in
    its forward), so it is not timed alone; forward and step are. ``kept_bytes(output)``: bytes the op keeps
    for backward outside autograd's saved tensors (e.g. those gradients), added to ``saved_for_backward``.
    """

    provider: str
    backend: str
    role: str
    forward: Callable[[], torch.Tensor]
    grad_output: torch.Tensor | None
    grads: Sequence[torch.Tensor] = ()
    parameters: Any = ()
    context: Callable[[], ContextManager] = contextlib.nullcontext
    flops_context: Callable[[], ContextManager] | None = None
    has_backward: bool = True
    backward_alone: bool = True
    kept_bytes: Callable[[Any], int] | None = None

    @property
    def label(self) -> str:
        return f"{self.provider}[{self.backend}]" if self.role == "fastft" else self.provider

    def _in_context(self, fn: Callable[[], Any], flops: bool = False) -> Callable[[], Any]:
        context = (self.flops_context or self.context) if flops else self.context

        def call():
            with context():
                return fn()

        return call

    def drop_grads(self) -> None:
        for tensor in self.grads:
            tensor.grad = None

    def _backward_of(self, output: torch.Tensor, retain_graph: bool = False) -> None:
        if self.grad_output is None:
            output.backward(retain_graph=retain_graph)
        else:
            output.backward(self.grad_output, retain_graph=retain_graph)

    def forward_fn(self) -> Callable[[], Any]:
        return self._in_context(self.forward)

    def step_fn(self) -> Callable[[], None]:
        def step():
            self.drop_grads()
            output = self.forward()
            if self.has_backward:
                self._backward_of(output)

        return self._in_context(step)

    def backward_fn(self) -> Callable[[], None]:
        """The backward alone, on a graph built once now and retained."""
        output = self.forward_fn()()

        def backward():
            self.drop_grads()
            self._backward_of(output, retain_graph=True)

        return self._in_context(backward)

    def results(self) -> list[torch.Tensor]:
        """Output and gradients of one fresh step (for the agreement check)."""
        def run():
            self.drop_grads()
            output = self.forward()
            if self.has_backward:
                self._backward_of(output)
            return output

        output = self._in_context(run)()
        values = [output.detach()]
        if self.has_backward:
            values += [t.grad.detach().clone() for t in self.grads if t.grad is not None]
        self.drop_grads()
        return values


def model_step_subject(provider: str, backend: str, role: str, model: torch.nn.Module, inputs: dict[str, Any],
                       grads: Sequence[torch.Tensor] | None = None, **kwargs) -> Subject:
    """A training step of a causal LM as a :class:`Subject`: ``model(**inputs).loss`` then its backward.

    ``grads``: the leaves whose gradients the step produces (default: the parameters that require grad now);
    the model's parameters are excluded from saved bytes. ``kwargs`` go to :class:`Subject` (``context``...).
    """
    if grads is None:
        grads = [p for p in model.parameters() if p.requires_grad]
    return Subject(provider, backend, role, lambda: model(**inputs).loss, None, list(grads), model, **kwargs)


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


def measure_peaks(device: torch.device, dtypes: Iterable[str], size: int = 8192) -> Peaks:
    """Measure the device's matmul FLOP/s per dtype (a size³ GEMM) and copy bandwidth (1 GiB), with do_bench."""
    from triton.testing import do_bench

    flops = {}
    for name in dtypes:
        a = torch.randn(size, size, device=device, dtype=DTYPES[name])
        b = torch.randn(size, size, device=device, dtype=DTYPES[name])
        ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
        flops[name] = 2 * size**3 / (ms / 1e3)
        del a, b
    src = torch.empty(2**28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (ms / 1e3)
    del src, dst
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    how = (f"peaks measured on this device: {size}³ matmul " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in flops.items())
           + f" (TF32 {tf32}), 1 GiB copy {bandwidth / 1e9:.0f} GB/s")
    return Peaks(flops, bandwidth, how)


def calibrate_gemm(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul FLOP/s right now (median of size³ GEMMs; for duration estimates only)."""
    import statistics
    import time

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / max(statistics.median(seconds), 1e-9)


def contention() -> float:
    """The 1-minute load average per core, at least 1: how much slower fixed costs (imports, start-up) run now."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except (AttributeError, OSError):
        return 1.0


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
