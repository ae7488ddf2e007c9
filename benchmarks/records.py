"""The suite's result rows: one CSV schema for every benchmark, appended run after run.

One row is one figure: a metric of one provider (on one backend) in one mode at one point of a sweep::

    op        the benchmark's op ("lora", "qlora", "e2e-lora" ...)
    provider  who computes it: "fastft", a peer ("peft", "pytorch" = plain eager PyTorch, ...), a floor
              ("frozen": the frozen layer alone, what the op cannot beat) or "roofline" (an estimate)
    backend   fastft: the backend that ran ("torch" reference, "triton", "cuda"); peers: what runs them
    role      "fastft", "peer", "floor" or "estimate": the summary compares fastft with the best *peer*
    mode      "forward", "backward", "step" (forward + backward), "train" (end to end) ...
    metric    "time", "saved_for_backward", "peak_live", "peak_allocated", "flops", "max_rel_diff",
              "peak_rss", "loss" ... and "skipped" / "failed" (the note says why)
    unit      "s", "bytes", "flop", ...
    x_name    the swept variable ("hidden", "tokens", "rank", "dtype"; "step" for curves)
    x_value   its value at this point
    p50 p20 p80   median and 20th / 80th percentiles (equal for exact counts; empty for skipped/failed)
    config    the whole point as "key=value" pairs
    device processor threads allocator torch triton fastft timestamp
              where and with what it ran (processor: the CPU model, and the GPU's name on CUDA; threads:
              torch's intra-op threads; allocator: how freed memory is reused, ``benchmarks.allocator``),
              when (UTC, ISO 8601)
    load_start  the machine's 1-minute load average when the row's case started
    load_avg  the 1-minute load average when the row was recorded, at the end of its case (CPU timings
              are noisy when other processes compete for the cores)
    sweep     "quick" (a check that the suite runs: small shapes, few rounds, never published) or "full"
    command   the exact command line that produced the row (to reproduce it)
    run_id    the start time of the run that wrote the row (the renderer shows the latest run)
    note      free text: the method of an estimate, why something was skipped, the error of a failure;
              "noisy: ..." when repeated timings of the case disagreed (see ``benchmarks.harness``)
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import torch

ROLES = ("fastft", "peer", "floor", "estimate")


@dataclass
class Row:
    op: str
    provider: str
    backend: str
    role: str
    mode: str
    metric: str
    unit: str
    x_name: str
    x_value: str
    p50: float | None
    p20: float | None
    p80: float | None
    config: str
    device: str
    processor: str
    threads: int
    allocator: str
    torch: str
    triton: str
    fastft: str
    timestamp: str
    load_start: float | None
    load_avg: float | None
    sweep: str
    command: str
    run_id: str
    note: str = ""


FIELDS = tuple(f.name for f in fields(Row))


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def format_config(config: dict[str, Any]) -> str:
    """``{"hidden": 1024, "dtype": "float32"}`` -> ``"hidden=1024 dtype=float32"`` (the CSV's config cell)."""
    return " ".join(f"{key}={value}" for key, value in config.items())


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the row says so rather than failing
        return "not installed"


def processor_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``) and its core count."""
    import platform

    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    """``cpu`` or ``cuda:<name of the GPU>`` (the CSV's device cell)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass(frozen=True)
class Environment:
    """What every row of one run shares: device, threads, versions, the run's id."""

    device: str
    threads: int
    torch: str
    triton: str
    fastft: str
    run_id: str
    processor: str = ""
    sweep: str = ""
    command: str = ""
    allocator: str = ""

    @classmethod
    def current(cls, device: torch.device, sweep: str = "", command: str = "", allocator: str = "") -> "Environment":
        return cls(
            device=device_name(device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            triton=_version("triton"),
            fastft=_version("fastft"),
            run_id=utc_now(),
            processor=processor_name(),
            sweep=sweep,
            command=command,
            allocator=allocator,
        )

    def row(self, load_start: float | None = None, **values: Any) -> Row:
        """A row stamped with this environment, the time and the load average now (and at its case's start)."""
        return Row(**values, **asdict(self), timestamp=utc_now(), load_start=load_start, load_avg=load_average())


class CsvWriter:
    """Appends rows to a CSV file (the header is written when the file is new).

    An existing file must have this schema's header: a file written by another version of the suite is
    refused up front (:meth:`check`), before anything is measured, with what to do about it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def check(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            raise ValueError(
                f"{self.path} has another header ({len(header)} columns) than this suite writes: move it away "
                f"or choose another --out directory. Expected: {','.join(FIELDS)}"
            )

    def append(self, rows: Iterable[Row]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
        return len(rows)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a results CSV as a dict; p50/p20/p80/load_avg as floats (None when empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("p50", "p20", "p80", "load_avg", "load_start"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        row["threads"] = int(row["threads"]) if row.get("threads") else None
    return rows
