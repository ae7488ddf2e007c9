"""Segment GEMMs over rows sorted by group (MoE experts), and the choice of how to run them.

For x (S×K) whose rows are sorted by expert, ``offsets`` (E+1, int64; expert e owns rows ``offsets[e]:offsets[e+1]``;
rows at or past ``offsets[E]`` belong to no expert)::

    segment_mm(x, w, offsets)    -> y (S×N),    y[rows e] = x[rows e] · w[e]          (w: E×K×N, any strides)
    segment_mm_t(a, b, offsets)  -> out (E×P×N), out[e] = a[rows e]ᵀ · b[rows e]      (weight gradients)

Rows of no expert give zero rows of y; an expert with no rows gives a zero ``out[e]``.

Two paths compute the same products (this module holds no ``torch.library`` op; the expert ops call it):
  - ``"grouped"``: one ``torch._grouped_mm`` call for all experts (CUTLASS grouped GEMM on CUDA).
  - ``"loop"``: one ``torch.mm`` per non-empty expert segment (cuBLAS on CUDA), reading ``offsets`` on the host.

:func:`segment_path` picks ``"grouped"`` on CUDA devices of compute capability 9.0 or newer (Hopper: torch's
grouped GEMM kernel) for bfloat16 operands whose inner dimensions are multiples of 8 (16-byte aligned rows, the
kernel's requirement), and ``"loop"`` everywhere else (CPU, older GPUs, float32/float16, odd shapes).
``FASTFT_GROUPED_MM=loop|grouped`` forces a path (``grouped`` still only where rows are 16-byte aligned; ``auto``,
the default, chooses as above); the CPU build of torch runs ``torch._grouped_mm`` too (a reference fallback, same
alignment rule), which is how the tests check the grouped path here.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

PATHS = ("loop", "grouped")


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``, or None off CUDA (tests replace this)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def grouped_mm_mode() -> str:
    """``FASTFT_GROUPED_MM``: ``loop``, ``grouped`` or ``auto`` (default)."""
    value = os.environ.get("FASTFT_GROUPED_MM", "auto").strip().lower() or "auto"
    if value not in ("auto",) + PATHS:
        raise ValueError(f"FASTFT_GROUPED_MM={value!r}; choose loop, grouped or auto (the default), or unset it.")
    return value


def segment_path(device: torch.device | str, dtype: torch.dtype, dims: Sequence[int] = ()) -> str:
    """``"grouped"`` or ``"loop"`` for segment GEMMs on ``device`` in ``dtype`` whose inner dimensions are ``dims``
    (see the module docstring)."""
    mode = grouped_mm_mode()
    aligned = all((d * torch.empty(0, dtype=dtype).element_size()) % 16 == 0 for d in dims)
    if mode == "loop" or not hasattr(torch, "_grouped_mm") or not aligned:
        return "loop"
    if mode == "grouped":
        return mode
    capability = device_capability(torch.device(device))
    if capability is None or capability < (9, 0) or dtype != torch.bfloat16:
        return "loop"
    return "grouped"


def describe_path(device: torch.device | str, dtype: torch.dtype, dims: Sequence[int] = ()) -> str:
    """What the patch report says about the expert GEMMs."""
    path = segment_path(device, dtype, dims)
    return "grouped GEMM (torch._grouped_mm)" if path == "grouped" else "one GEMM per expert segment"


def _ends(offsets: Tensor) -> Tensor:
    return offsets[1:].to(torch.int32)


def segment_mm(x: Tensor, w: Tensor, offsets: Tensor, path: str = "loop") -> Tensor:
    """``y[rows e] = x[rows e] · w[e]`` (module docstring); x S×K, w E×K×N."""
    S, N = x.shape[0], w.shape[2]
    if path == "grouped":
        y = torch._grouped_mm(x, w, offs=_ends(offsets))
        rows = torch.arange(S, device=x.device)
        return y.masked_fill_((rows >= offsets[-1]).unsqueeze(1), 0)
    y = x.new_zeros(S, N)
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x[lo:hi], w[e], out=y[lo:hi])
    return y


def segment_mm_t(a: Tensor, b: Tensor, offsets: Tensor, path: str = "loop") -> Tensor:
    """``out[e] = a[rows e]ᵀ · b[rows e]`` (module docstring); a S×P, b S×N -> E×P×N."""
    E = offsets.shape[0] - 1
    if path == "grouped":
        total = offsets[-1]
        rows = torch.arange(a.shape[0], device=a.device)
        a = a.masked_fill((rows >= total).unsqueeze(1), 0)  # rows of no expert: outside every segment anyway
        out = torch._grouped_mm(a.t(), b, offs=_ends(offsets))
        empty = (offsets[1:] == offsets[:-1]).view(E, 1, 1)
        return out.masked_fill_(empty, 0)
    out = a.new_zeros(E, a.shape[1], b.shape[1])
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
    return out
