"""What every rendered output (the summary, the plots, the results page, the console) says the same way: how a
provider is labelled, the order of metrics and modes, units and number formats, and the conditions footer."""
from __future__ import annotations

import math
from typing import Any

from fastft.measure import format_bytes

MODE_ORDER = ("forward", "backward", "step", "train")
METRIC_ORDER = ("time", "saved_for_backward", "peak_live", "peak_allocated", "flops", "max_rel_diff", "final_loss",
                "peak_rss_train", "peak_rss", "rss_baseline", "trainable_params", "loss", "min_bytes")
NOT_PLOTTED = {"skipped", "failed", "min_bytes", "trainable_params"}
UNIT_SCALE = {"s": (1e3, "ms"), "bytes": (1 / 2**20, "MiB"), "flop": (1e-9, "GFLOP")}


def label(row: dict[str, Any]) -> str:
    """How a provider is named in plots and tables: fastft[backend], peft, frozen (floor), roofline (estimate)."""
    if row["role"] == "fastft":
        return f"{row['provider']}[{row['backend']}]"
    if row["role"] == "floor":
        return f"{row['provider']} (floor)"
    if row["role"] == "estimate":
        return f"{row['provider']} (estimate)"
    return row["provider"]


def select_run(rows: list[dict[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    """Rows of run ``run_id`` (default: the latest run in the file; "all": every row)."""
    if run_id == "all" or not rows:
        return rows
    wanted = run_id or max(r["run_id"] for r in rows)
    return [r for r in rows if r["run_id"] == wanted]


def ordered(values, order) -> list:
    """``values`` without repeats, those named in ``order`` first in its order, then the rest as they came."""
    values = list(dict.fromkeys(values))
    rank = {v: i for i, v in enumerate(order)}
    return sorted(values, key=lambda v: (rank.get(v, len(order)), values.index(v)))


def with_figures(rows):
    """The rows that carry a figure (not skipped, not failed, with a median)."""
    return [r for r in rows if r["metric"] not in ("skipped", "failed") and r["p50"] is not None]


def number(value: str) -> float | None:
    """A CSV cell as a float, None where it holds none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def conditions(rows: list[dict[str, Any]]) -> str:
    """Where, with what and how loaded the rows ran, and the command: the footer of every figure and summary."""
    first = rows[0]
    starts = [r["load_start"] for r in rows if r.get("load_start") is not None]
    ends = [r["load_avg"] for r in rows if r.get("load_avg") is not None]
    load = (f"1-min load {min(starts):.1f}–{max(starts):.1f} before its cases, {min(ends):.1f}–{max(ends):.1f} after"
            if starts and ends else
            f"1-min load {min(ends):.1f}–{max(ends):.1f}" if ends else "load n/a")
    allocators = list(dict.fromkeys(r.get("allocator") or "allocator not recorded" for r in rows))
    return (f"{first['device']} | {first.get('processor') or 'processor not recorded'} | {first['threads']} threads | "
            f"allocator: {'; '.join(allocators)} | {load} | torch {first['torch']}, triton {first['triton']}, fastft {first['fastft']} | run "
            f"{first['run_id']}\nreproduce: {first.get('command') or 'python -m benchmarks'}")


def is_quick(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("sweep") == "quick" for r in rows)


def format_seconds(value: float) -> str:
    """Seconds as "812 µs", "12.3 ms" or "2.01 s" (three significant digits)."""
    if abs(value) >= 1:
        return f"{value:.3g} s"
    if abs(value) >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


def format_value(value: float | None, unit: str, compact: bool = False) -> str:
    """A figure with its unit for tables; ``compact`` (the console): bytes in B/KiB/MiB/GiB, FLOPs as "G"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        return format_seconds(value)
    if unit == "bytes":
        return format_bytes(value) if compact else f"{value / 2**20:.3g} MiB"
    if unit == "flop":
        return f"{value / 1e9:.3g} {'G' if compact else 'GFLOP'}"
    if unit in ("abs", "rel"):
        return f"{value:.1e}"
    if unit == "params":
        return f"{int(value):,}"
    return f"{value:.4g}"
