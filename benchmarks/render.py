"""Render a results CSV: PNG plots (one per op and metric, providers as lines) and a markdown summary.

    python -m benchmarks.render                       # bench-results/results.csv, its latest run
    python -m benchmarks.render DIR_OR_CSV --run all  # every run in the file (later rows win at equal points)

Plots go to ``<out>/plots/<op>-<metric>.png``: one panel per mode (rows) and swept variable (columns),
a line per provider (fastft solid, peers thin, floors dashed grey, estimates dotted), the p20–p80 band
shaded. The summary (``<out>/summary.md``) has, per op, a table per metric and mode: the median of every
provider at every point, and for each fastft backend its ratio to the best peer at that point (the
lowest figure among the peers; below 1 means fastft is better). Floors (e.g. the frozen layer alone) and
estimates (the roofline) are shown beside the figures but are not peers. Curves (``x_name == "step"``,
e.g. the loss at each training step) are plotted, not tabled. matplotlib is imported only to draw.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import read_rows

MODE_ORDER = ("forward", "backward", "step", "train")
METRIC_ORDER = ("time", "saved_for_backward", "peak_live", "peak_allocated", "flops", "max_rel_diff", "final_loss",
                "peak_rss_train", "peak_rss", "rss_baseline", "trainable_params", "loss", "min_bytes")
NOT_PLOTTED = {"skipped", "failed", "min_bytes", "trainable_params"}
UNIT_SCALE = {"s": (1e3, "ms"), "bytes": (1 / 2**20, "MiB"), "flop": (1e-9, "GFLOP")}


@dataclass
class Rendered:
    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


def _ordered(values, order) -> list:
    values = list(dict.fromkeys(values))
    rank = {v: i for i, v in enumerate(order)}
    return sorted(values, key=lambda v: (rank.get(v, len(order)), values.index(v)))


def _figures(rows):
    return [r for r in rows if r["metric"] not in ("skipped", "failed") and r["p50"] is not None]


def _number(value: str) -> float | None:
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
    return (f"{first['device']} | {first.get('processor') or 'processor not recorded'} | {first['threads']} threads | "
            f"{load} | torch {first['torch']}, triton {first['triton']}, fastft {first['fastft']} | run "
            f"{first['run_id']}\nreproduce: {first.get('command') or 'python -m benchmarks'}")


def is_quick(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("sweep") == "quick" for r in rows)


def plot(rows: list[dict[str, Any]], plot_dir: Path, warnings: list | None = None) -> list[Path]:
    """:func:`benchmarks.plots.plot` (the plots live there; it imports this module's helpers)."""
    from .plots import plot as draw

    return draw(rows, plot_dir, warnings)


# ----------------------------------------------------------------------------------- summary
def format_seconds(value: float) -> str:
    """Seconds as "812 µs", "12.3 ms" or "2.01 s" (three significant digits)."""
    if abs(value) >= 1:
        return f"{value:.3g} s"
    if abs(value) >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return format_seconds(value)
    if unit == "bytes":
        return f"{value / 2**20:.3g} MiB"
    if unit == "flop":
        return f"{value / 1e9:.3g} GFLOP"
    if unit in ("abs", "rel"):
        return f"{value:.1e}"
    if unit == "params":
        return f"{int(value):,}"
    return f"{value:.4g}"


def summary_tables(rows: list[dict[str, Any]], ops: list[str] | None = None,
                   metrics: list[tuple[str, str]] | None = None, heading: str = "###") -> str:
    """Markdown tables of ``rows``: per op, per (metric, mode), providers as columns, fastft / best peer.

    ``ops`` and ``metrics`` ((metric, mode) pairs) restrict what is shown.
    """
    figures = [r for r in _figures(rows) if r["x_name"] != "step"]
    out = []
    for op in dict.fromkeys(r["op"] for r in figures):
        if ops is not None and op not in ops:
            continue
        op_rows = [r for r in figures if r["op"] == op]
        out.append(f"{heading[:-1]} {op}\n")
        pairs = list(dict.fromkeys((r["metric"], r["mode"]) for r in op_rows))
        pairs.sort(key=lambda p: (METRIC_ORDER.index(p[0]) if p[0] in METRIC_ORDER else len(METRIC_ORDER),
                                  MODE_ORDER.index(p[1]) if p[1] in MODE_ORDER else len(MODE_ORDER)))
        if metrics is not None:
            pairs = [p for p in pairs if p in metrics]
        configs = list(dict.fromkeys(r["config"] for r in op_rows))
        if len(configs) == 1:  # one point (e.g. end to end): one table, a line per metric
            out.append(f"Point: {configs[0].replace(' ', ', ')}\n")
            out.append(_table_by_metric(pairs, op_rows))
            continue
        for metric, mode in pairs:
            group = [r for r in op_rows if r["metric"] == metric and r["mode"] == mode]
            out.append(_table(metric, mode, group, heading))
    return "\n".join(out)


def _columns(group: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(every provider label in display order, the fastft ones, the peers)."""
    roles = {label(r): r["role"] for r in group}
    order = {"fastft": 0, "peer": 1, "floor": 2, "estimate": 3}
    names = sorted(roles, key=lambda n: (order.get(roles[n], 4), list(roles).index(n)))
    return names, [n for n in names if roles[n] == "fastft"], [n for n in names if roles[n] == "peer"]


def _ratio_cells(values: dict[str, float | None], fastft_names: list[str], peers: list[str]) -> list[str]:
    """fastft / best (lowest) peer, for each fastft column."""
    peer_values = [(values[p], p) for p in peers if values.get(p) is not None]
    best = min(peer_values) if peer_values else None
    cells = []
    for name in fastft_names:
        value = values.get(name)
        if best is None or value is None or best[0] == 0:
            cells.append("-")
        else:
            cells.append(f"{value / best[0]:.2f}× ({best[1]})")
    return cells


def _table_by_metric(pairs: list[tuple[str, str]], op_rows: list[dict[str, Any]]) -> str:
    names, fastft_names, peers = _columns(op_rows)
    header = ["metric", *names] + ([f"{n} / best peer" for n in fastft_names] if peers else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, mode in pairs:
        group = [r for r in op_rows if r["metric"] == metric and r["mode"] == mode]
        unit = group[0]["unit"]
        values = {label(r): r["p50"] for r in group}
        row = [f"{metric.replace('_', ' ')} ({mode}{', median' if unit == 's' else ''})"]
        row += [format_value(values.get(n), unit) for n in names]
        if peers:
            row += _ratio_cells(values, fastft_names, peers)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _table(metric: str, mode: str, group: list[dict[str, Any]], heading: str) -> str:
    unit = group[0]["unit"]
    names, fastft_names, peers = _columns(group)
    configs = list(dict.fromkeys(r["config"] for r in group))
    header = ["point", *names] + ([f"{n} / best peer" for n in fastft_names] if peers else [])
    lines = [f"{heading} {metric.replace('_', ' ')}, {mode}" + (" (median)" if unit == "s" else "") + "\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in configs:
        values = {label(r): r["p50"] for r in group if r["config"] == config}  # later rows win
        row = [config.replace(" ", ", ")]
        row += [format_value(values.get(n), unit) for n in names]
        if peers:
            row += _ratio_cells(values, fastft_names, peers)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(rows: list[dict[str, Any]], warnings: list | None = None) -> str:
    """The whole summary: the run's conditions, its failures, skips and sanity warnings, then the tables."""
    from . import sanity

    if not rows:
        return "# fastft benchmark summary\n\nNo rows.\n"
    if warnings is None:
        warnings = sanity.check(rows)
    quick = is_quick(rows)
    out = [
        "# fastft benchmark summary" + (" — QUICK CHECK (small shapes, few rounds: checks that the suite runs; "
                                        "not results)" if quick else "") + "\n",
        "Conditions: " + conditions(rows).replace("\n", "; ") + "\n",
        "Figures are medians (the CSV also has the 20th and 80th percentiles). \"fastft / best peer\" divides "
        "fastft's figure by the lowest peer figure at the same point: below 1 means fastft is better. Floors "
        "(the frozen layer alone) and estimates (roofline) are shown but are not peers. Each table row's point "
        "names every parameter of the case. CPU timings taken while other processes run are noisy; byte and "
        "FLOP counts are exact.\n",
    ]
    failed = [r for r in rows if r["metric"] == "failed"]
    if failed:
        out.append("## FAILED\n")
        out += [f"- **{r['op']}**: {r['note']}" for r in failed]
        out.append("")
    if warnings:
        out.append(f"## Sanity warnings ({len(warnings)}, {sum(1 for w in warnings if w.explanation)} explained)\n")
        out += [f"- {w.text()}" for w in warnings]
        out.append("")
    skipped = list(dict.fromkeys(r["note"] for r in rows if r["metric"] == "skipped"))
    if skipped:
        out.append("## Skipped and not run here\n")
        out += [f"- {note}" for note in skipped]
        out.append("")
    out.append("## Results\n")
    out.append(summary_tables(rows))
    return "\n".join(out)


def render(csv_path: str | Path, out_dir: str | Path, run_id: str | None = None) -> Rendered:
    """Write ``<out_dir>/summary.md`` and the plots for run ``run_id`` (default: the latest) of ``csv_path``."""
    out_dir = Path(out_dir)
    rows = select_run(read_rows(csv_path), run_id)
    summary_path = out_dir / "summary.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    from . import sanity

    warnings = sanity.check(rows)
    summary_path.write_text(summary_markdown(rows, warnings))
    rendered = Rendered(summary_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        rendered.notes.append('matplotlib is not installed: plots skipped (pip install -e ".[bench]" from the fastft checkout)')
        return rendered
    rendered.plots = plot(rows, out_dir / "plots", warnings)
    return rendered


def main(argv: list[str] | None = None) -> Rendered:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", default="bench-results", help="a results CSV or the directory holding results.csv")
    parser.add_argument("--run", default=None, help="run id to render (default: the latest; 'all': every row)")
    parser.add_argument("--out", default=None, help="where summary.md and plots/ go (default: beside the CSV)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    csv_path = path / "results.csv" if path.is_dir() else path
    rendered = render(csv_path, args.out or csv_path.parent, args.run)
    print(f"wrote {rendered.summary_path} and {len(rendered.plots)} plots")
    for note in rendered.notes:
        print(f"note: {note}")
    return rendered


if __name__ == "__main__":
    main(sys.argv[1:])
