"""What ``python -m benchmarks`` prints while it runs: a table per case, durations, the progress bar."""
from __future__ import annotations

import sys

from . import harness
from .presentation import format_value
from .protocol import Case, Measurement


def _fmt(value: float | None, unit: str) -> str:
    return format_value(value, unit, compact=True)


_CONSOLE_COLUMNS = [
    ("time", "forward", "fwd"), ("time", "backward", "bwd"), ("time", "step", "step"),
    ("saved_for_backward", "forward", "saved"), ("peak_live", "step", "peak live"),
    ("peak_allocated", "step", "peak alloc"), ("flops", "step", "FLOP"), ("max_rel_diff", "step", "rel diff"),
    ("time", "train", "step time"), ("final_loss", "train", "loss"), ("peak_rss", "train", "peak RSS"),
    ("peak_rss_train", "train", "RSS train"), ("peak_allocated", "train", "peak alloc"),
]


def format_case(case: Case, measurements: list[Measurement]) -> str:
    """A small table of one case: a line per provider, the main figures as columns, then skip notes."""
    figures = [m for m in measurements if m.x is None and m.p50 is not None]
    labels: list[str] = []
    for m in figures:
        label = _label(m.provider, m.backend, m.role)
        if label not in labels:
            labels.append(label)
    present = {(m.metric, m.mode) for m in figures}
    columns = [c for c in _CONSOLE_COLUMNS if (c[0], c[1]) in present]
    cell = {(_label(m.provider, m.backend, m.role), m.metric, m.mode): _fmt(m.p50, m.unit) for m in figures}
    table = [["provider", *(c[2] for c in columns)]]
    table += [[label, *(cell.get((label, c[0], c[1]), "") for c in columns)] for label in labels]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [f"{case.label}"] if figures else []
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table] if figures else []
    lines += [f"  skipped {_label(m.provider, m.backend, m.role)}: {m.note}" for m in measurements if m.metric == "skipped"]
    return "\n".join(lines)


def _label(provider: str, backend: str, role: str) -> str:
    if role == "fastft":
        return f"{provider}[{backend}]"
    if role == "estimate":
        return f"{provider} (estimate)"
    if role == "floor":
        return f"{provider} (floor)"
    return provider


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


class Progress:
    """tqdm over the cases when installed (and ``enabled``), otherwise a plain "[i/n] case" line each."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done = total, 0
        self.bar = None
        if enabled and harness.installed("tqdm"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label[:60])
        else:
            print(f"[{self.done + 1}/{self.total}] {label} ...", flush=True)

    def write(self, text: str) -> None:
        if not text:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
