"""What the demo prints: loss curves, costs, the backend sentence, a progress bar."""
from __future__ import annotations

import contextlib
import sys

from ..measure import Timing


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def backend_sentence(report) -> str:
    backends = report.backends
    names = ", ".join(f"{b} ({n} modules)" for b, n in backends.items())
    if set(backends) == {"torch"}:
        return (f"backend: {names} -- the PyTorch reference implementation. fastft's Triton kernels run on CUDA "
                "GPUs; on a CPU fastft runs its reference, the same math as PEFT's layers, so expect no speed-up "
                "here: these figures show fastft's costs on the CPU, not its GPU kernels.")
    return f"backend: {names}"


def format_curves(losses: dict[str, list[float]], every: int) -> str:
    """The loss of each variant every ``every`` steps (and the last), with |fastft - PEFT|."""
    steps = len(losses["fastft"])
    shown = sorted({*range(0, steps, every), steps - 1})
    with_peft = "PEFT" in losses
    lines = [f"{'step':>5}  {'fastft loss':>11}" + (f"  {'PEFT loss':>11}  {'|diff|':>9}" if with_peft else "")]
    for i in shown:
        line = f"{i + 1:>5}  {losses['fastft'][i]:>11.5f}"
        if with_peft:
            line += f"  {losses['PEFT'][i]:>11.5f}  {abs(losses['fastft'][i] - losses['PEFT'][i]):>9.2e}"
        lines.append(line)
    return "\n".join(lines)


def format_costs(timings: dict[str, Timing], peak_live: dict[str, int]) -> str:
    """Median step time with its p20-p80 spread, and peak live tensor bytes, per variant."""
    names = list(timings)
    rows = [
        ("median step time", [f"{timings[n].median_s * 1e3:.0f} ms" for n in names]),
        ("  p20-p80", [f"{timings[n].p20_s * 1e3:.0f}-{timings[n].p80_s * 1e3:.0f} ms" for n in names]),
        ("  timed steps", [str(timings[n].repeats) for n in names]),
        ("peak live tensors, one step", [mib(peak_live.get(n)) for n in names]),
    ]
    width = max(len(label) for label, _ in rows)
    lines = ["".ljust(width) + "".join(f"  {n:>14}" for n in names)]
    lines += [label.ljust(width) + "".join(f"  {c:>14}" for c in cells) for label, cells in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True):
    """A tqdm bar on stderr counting training steps (of all variants); a no-op when disabled or without tqdm."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="training steps", unit="step", file=sys.stderr, leave=True)
        except ImportError:
            bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
