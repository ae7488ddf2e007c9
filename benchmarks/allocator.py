"""The CPU allocator the suite times under: freed memory kept in the process, as a GPU caching allocator keeps it.

With glibc's defaults a block above 32 MiB (a 4096² float32 weight, a tokens × vocab logits tensor) is mapped fresh
from the kernel on every allocation and unmapped when freed, so every call that allocates one pays a page fault per
4 KiB page it touches: measured on this project's CPU (2026-12-07), a 4096² fake-quantization forward took 44 ms
with 16,385 faults a call, and 18 ms with none once freed memory was kept. A GPU never pays that (torch's CUDA caching allocator reuses freed blocks), and whether
glibc maps or reuses a block differs between timed modes, which broke "step ≈ forward + backward". So full runs
time with glibc told to serve every block from the heap (``M_MMAP_MAX = 0``) and never to give freed memory back
(``M_TRIM_THRESHOLD`` at its maximum): after the warm-up, a call's tensors reuse pages already faulted in.

Every row states the allocator (the CSV's ``allocator`` column, the conditions footer). ``--allocator system``
keeps glibc's defaults; ``--quick`` uses them (its timings are not published). Peak-live and saved-bytes figures
count PyTorch's allocation events, which this does not change. End-to-end cases run in processes of their own,
under the system allocator (their resident-memory figures need memory given back), and their rows say so.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator

import torch

SYSTEM = "system default"
KEPT = "glibc malloc, freed memory kept (M_MMAP_MAX=0, no trim): reused without page faults, as on a GPU"
CUDA = "torch's CUDA caching allocator"

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def describe(mode: str, device: torch.device) -> str:
    """What the allocator will be for ``mode`` ("kept" or "system") on ``device``: the rows' ``allocator``."""
    if device.type == "cuda":
        return CUDA
    if mode == "kept":
        return KEPT if _glibc() is not None else f"{SYSTEM} (not glibc: freed memory cannot be kept)"
    return SYSTEM


@contextlib.contextmanager
def freed_memory_kept(device: torch.device) -> Iterator[None]:
    """glibc keeps freed memory for reuse inside the block (CPU, glibc only; elsewhere nothing changes).

    Afterwards glibc's defaults are set again and what can be is given back (``malloc_trim``); memory the heap
    still holds may go on serving blocks that fit in it."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        raise RuntimeError("glibc refused mallopt(M_MMAP_MAX, 0) / mallopt(M_TRIM_THRESHOLD): run with "
                           "--allocator system")
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
