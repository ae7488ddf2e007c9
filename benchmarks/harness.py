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

import importlib.util
from typing import Any, Callable, Sequence, Union

import torch

from fastft.dispatch import use_backend as forced_backend  # the one copy of the context manager
# the protocol, the measurement procedure and the device probes live in their own modules; every name is
# reachable from here, where the benchmark modules import them
from .device_peaks import calibrate_gemm, contention, measure_peaks  # noqa: F401
from .measuring import (WARM_UP_CALLS, WARM_UP_S, halves_disagree, layer_case, layer_estimate,  # noqa: F401
                        max_rel_diff, measure_subjects, roofline_estimates, time_calls, time_checked, warm_up)
from .protocol import (DTYPES, Benchmark, Case, Context, Measurement, Peaks, Skipped, Subject,  # noqa: F401
                       model_step_subject, sweep_of, sweep_points)

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


# a forward + backward compiled by inductor on 2 CPU cores, for duration estimates only (2026-12-07, empty cache: whole
# small cases with 2 and 6 compiled peers took 16 s and 27 s; the --full run with 17 compiled peers 3.2 min in all)
COMPILE_SECONDS = 10.0


def compiled_peer(ctx: "Context", fn: Callable[..., Any], args: Sequence[Any], grad_output: torch.Tensor | None,
                  grads: Sequence[torch.Tensor], parameters: Any = (), what: str = "the op's PyTorch reference",
                  **kwargs) -> Union["Subject", "Skipped"]:
    """``torch.compile(fn)`` as a peer ("torch.compile", backend "inductor"): the strong, fair peer every op gets.

    ``fn(*args)`` is the op's plain PyTorch reference (autograd differentiates it; inductor compiles forward
    and backward). Not built in ``--quick`` (compiling one shape takes 5 to 60 s on 2 CPU cores) or where
    inductor cannot compile: a skipped row says which.
    """
    if device_type(ctx) == "cpu":
        missing = compiler_available()
        if missing:
            return not_run_here("torch.compile", "inductor", "peer", missing)
    if not ctx.compile:
        return Skipped("torch.compile", "inductor", "peer",
                       f"torch.compile of {what}: not run in --quick (compiling a shape takes 5 to 60 s on a "
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
