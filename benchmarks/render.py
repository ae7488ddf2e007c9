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

from . import sanity
from .plots import plot
from .presentation import METRIC_ORDER, MODE_ORDER, conditions, format_value, is_quick, label, select_run, with_figures
from .records import read_rows

@dataclass
class Rendered:
    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- summary
def summary_tables(rows: list[dict[str, Any]], ops: list[str] | None = None,
                   metrics: list[tuple[str, str]] | None = None, heading: str = "###") -> str:
    """Markdown tables of ``rows``: per op, per (metric, mode), providers as columns, fastft / best peer.

    ``ops`` and ``metrics`` ((metric, mode) pairs) restrict what is shown.
    """
    figures = [r for r in with_figures(rows) if r["x_name"] != "step"]
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
