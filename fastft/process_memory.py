"""Resident memory of this process (Linux ``/proc``), shared by ``fastft.demo`` and the benchmarks.

``peak_rss()`` is the process's high-water resident set size (``VmHWM``; elsewhere ``ru_maxrss``): it
includes Python, the imported libraries and everything the process ever held. ``reset_peak_rss()`` resets
the high-water mark to the current RSS (Linux >= 4.0, by writing 5 to ``/proc/self/clear_refs``) so a
later ``peak_rss()`` covers only what ran since; it returns False where that is impossible.
"""
from __future__ import annotations

import ctypes
import gc
import sys

__all__ = ["current_rss", "peak_rss", "proc_status_bytes", "release_freed_memory", "reset_peak_rss"]


def proc_status_bytes(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM`` ...) in bytes; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    """The resident set size now, in bytes (None where /proc is unavailable)."""
    return proc_status_bytes("VmRSS")


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so runs start alike."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak resident set size in bytes (since start, or since :func:`reset_peak_rss`)."""
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
