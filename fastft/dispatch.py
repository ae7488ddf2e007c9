"""The one place that decides which implementation of an op runs on which device.

Every op in ``fastft.ops`` registers the backends it implements with :func:`register_op`, and asks
:func:`backend_for` at call time. The default is the Triton kernel on a CUDA device and the PyTorch
reference everywhere else. ``FASTFT_BACKEND`` overrides the choice: a backend name, or a comma-separated
preference list (``FASTFT_BACKEND=triton,torch``). A forced backend that cannot run an op on a device is
an error, never a silent fallback.

Backends:
  ``torch``   the PyTorch reference implementation: the spec of each op; runs on any device.
  ``triton``  Triton kernels from ``fastft.kernels``; runs on CUDA, and on the CPU only under the Triton
              interpreter (``TRITON_INTERPRET=1``, set before fastft is imported), which the tests use.
"""
from __future__ import annotations

import functools
import os

import torch

KNOWN_BACKENDS = ("torch", "triton")

_OP_BACKENDS: dict[str, tuple[str, ...]] = {}


def register_op(op: str, backends: tuple[str, ...]) -> None:
    """Declare the backends that implement ``op`` (the reference ``torch`` one is mandatory)."""
    unknown = [b for b in backends if b not in KNOWN_BACKENDS]
    if unknown or "torch" not in backends:
        raise ValueError(f"op {op!r}: backends {backends} must include 'torch' and only {KNOWN_BACKENDS}")
    _OP_BACKENDS[op] = tuple(backends)


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runnable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        if not triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
    return False


def _forced() -> list[str]:
    value = os.environ.get("FASTFT_BACKEND", "").strip()
    if not value:
        return []
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    bad = [name for name in names if name not in KNOWN_BACKENDS]
    if bad:
        raise ValueError(
            f"FASTFT_BACKEND={value!r} names unknown backend(s) {bad}; choose from {list(KNOWN_BACKENDS)} "
            "(or a comma-separated preference list such as 'triton,torch'), or unset it."
        )
    return names


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` for tensors on ``device``."""
    device = torch.device(device)
    if op not in _OP_BACKENDS:
        raise KeyError(f"fastft op {op!r} is not registered; known ops: {sorted(_OP_BACKENDS)}")
    available = _OP_BACKENDS[op]
    forced = _forced()
    if forced:
        for name in forced:
            if name in available and _runnable(name, device):
                return name
        runnable = [b for b in available if _runnable(b, device)]
        why = ""
        if "triton" in forced and device.type == "cpu" and not triton_interpreter_enabled():
            why = " (Triton runs on the CPU only under TRITON_INTERPRET=1, set before importing fastft)"
        raise RuntimeError(
            f"FASTFT_BACKEND={os.environ['FASTFT_BACKEND']!r} cannot run op {op!r} on {device}{why}; "
            f"backends that can: {runnable}. Change or unset FASTFT_BACKEND."
        )
    if device.type == "cuda" and "triton" in available and _runnable("triton", device):
        return "triton"
    return "torch"


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Which backend each registered op uses on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {op: backend_for(op, device) for op in sorted(_OP_BACKENDS)}
