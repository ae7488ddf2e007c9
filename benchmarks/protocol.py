"""The suite's plug-in protocol: what a benchmark module hands the suite and what comes back.

:class:`Benchmark` (a named family of cases), :class:`Case` (one point), :class:`Measurement` (one
figure), :class:`Skipped` (a provider that cannot run here), :class:`Context` (what a case knows about the
run) and :class:`Subject` (one provider's implementation of an op at one point, ready to run). Reached
through ``benchmarks.harness``, which re-exports every name; see its docstring for the procedure.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from .records import Environment

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    own_process: bool = False  # measured in a process of its own, under the system allocator (end to end)

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


def sweep_of(op: str, sweeps: dict, ctx: "Context") -> tuple[dict[str, Any], dict[str, Sequence[Any]]]:
    """(base point, {variable: values}) of ``sweeps[(device type, sweep)]`` for this run; a clear error without one."""
    key = (ctx.device.type, ctx.sweep)
    if key not in sweeps:
        raise ValueError(f"{op}: no sweep for {key}; known: {sorted(sweeps)}")
    return sweeps[key]


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
