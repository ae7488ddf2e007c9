"""What the device and the machine can do now: peak FLOP/s and bandwidth (for roofline estimates), the
matmul speed and the load (for duration estimates). Reached through ``benchmarks.harness``.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from .protocol import DTYPES, Peaks


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
