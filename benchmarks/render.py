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


# ----------------------------------------------------------------------------------- plots
def plot(rows: list[dict[str, Any]], plot_dir: Path, warnings: list | None = None) -> list[Path]:
    """One PNG per (op, metric) of ``rows``; returns their paths. ``warnings``: sanity warnings drawn under
    the figure of their op and metric (default: :func:`benchmarks.sanity.check` of ``rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import sanity

    if warnings is None:
        warnings = sanity.check(rows)
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures = [r for r in _figures(rows) if r["metric"] not in NOT_PLOTTED]
    paths = []
    for op in dict.fromkeys(r["op"] for r in figures):
        op_rows = [r for r in figures if r["op"] == op]
        for metric in _ordered((r["metric"] for r in op_rows), METRIC_ORDER):
            group = [r for r in op_rows if r["metric"] == metric]
            mine = [w for w in warnings if w.op == op and w.metric == metric]
            paths.append(_plot_group(plt, op, metric, group, plot_dir, mine))
    return paths


STYLE = dict(fastft=dict(lw=2.2, marker="o"), peer=dict(lw=1.4, marker="s"),
             floor=dict(lw=1.2, ls="--", color="0.45", marker="."),
             estimate=dict(lw=1.2, ls=":", color="0.2", marker="x"))
LOG_SPAN = 50  # a panel whose figures span more than this factor is drawn on a log axis, and says so


def fixed_parameters(cell: list[dict[str, Any]], x_name: str) -> str:
    """The parameters of a panel's sweep that stay fixed: its points' config minus the swept variable."""
    fixed: dict[str, set] = {}
    for r in cell:
        for pair in r["config"].split():
            key, _, value = pair.partition("=")
            if key != x_name:
                fixed.setdefault(key, set()).add(value)
    return " ".join(f"{k}={'/'.join(sorted(v))}" for k, v in fixed.items())


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


def _plot_group(plt, op: str, metric: str, group: list[dict[str, Any]], plot_dir: Path, warnings: list) -> Path:
    import textwrap

    modes = _ordered((r["mode"] for r in group), MODE_ORDER)
    x_names = list(dict.fromkeys(r["x_name"] for r in group))
    unit = group[0]["unit"]
    scale, shown_unit = UNIT_SCALE.get(unit, (1.0, unit))
    notes = [textwrap.fill(("⚠ " if not w.explanation else "explained: ") + w.text(), 150) for w in warnings[:8]]
    if len(warnings) > 8:
        notes.append(f"... and {len(warnings) - 8} more sanity warnings (summary.md lists them all)")
    note_lines = sum(n.count("\n") + 1 for n in notes)
    height = 3.0 * len(modes) + 1.6 + 0.17 * note_lines
    fig, axes = plt.subplots(len(modes), len(x_names), figsize=(max(8.0, 4.2 * len(x_names) + 1.2), height),
                             squeeze=False)
    labels_seen = {}
    colors: dict[str, Any] = {}
    for i, mode in enumerate(modes):
        for j, x_name in enumerate(x_names):
            ax = axes[i][j]
            cell = [r for r in group if r["mode"] == mode and r["x_name"] == x_name]
            if not cell:
                ax.set_visible(False)
                continue
            xs_raw = list(dict.fromkeys(r["x_value"] for r in cell))
            numeric = all(_number(x) is not None for x in xs_raw) and len(xs_raw) > 1
            if numeric:
                xs_raw.sort(key=float)
            names = list(dict.fromkeys(label(r) for r in cell))
            for k, name in enumerate(names):
                points = {r["x_value"]: r for r in cell if label(r) == name}  # later rows win
                xs = [x for x in xs_raw if x in points]
                p50 = [points[x]["p50"] * scale for x in xs]
                p20 = [points[x]["p20"] * scale if points[x]["p20"] is not None else v for x, v in zip(xs, p50)]
                p80 = [points[x]["p80"] * scale if points[x]["p80"] is not None else v for x, v in zip(xs, p50)]
                role = points[xs[0]]["role"]
                style = dict(STYLE.get(role, dict(marker=".")))
                if name in colors:
                    style["color"] = colors[name]
                if numeric:  # a size: a line, the p20–p80 band shaded
                    positions = [float(x) for x in xs]
                    line, = ax.plot(positions, p50, label=name, **style)
                    ax.fill_between(positions, p20, p80, color=line.get_color(), alpha=0.2, lw=0)
                else:  # categories (dtype, a setting, one point): grouped points with p20–p80 error bars
                    offset = (k - (len(names) - 1) / 2) * 0.8 / max(len(names), 1)
                    positions = [xs_raw.index(x) + offset for x in xs]
                    style.pop("ls", None)
                    style.pop("lw", None)
                    line = ax.errorbar(positions, p50, yerr=[[max(0.0, a - b) for a, b in zip(p50, p20)],
                                                             [max(0.0, b - a) for a, b in zip(p50, p80)]],
                                       ls="none", capsize=4, elinewidth=1.5, label=name, **style).lines[0]
                colors.setdefault(name, line.get_color())
                labels_seen.setdefault(name, line)
            if numeric:
                values = [float(x) for x in xs_raw]
                if x_name != "step" and min(values) > 0 and max(values) / min(values) >= 4:  # sizes: log2
                    ax.set_xscale("log", base=2)
                ax.set_xticks(values)
                ax.set_xticklabels(xs_raw)
            else:
                ax.set_xticks(range(len(xs_raw)))
                ax.set_xticklabels(xs_raw)
                ax.set_xlim(-0.6, len(xs_raw) - 0.4)
            ys = [r["p50"] * scale for r in cell if r["p50"] > 0]
            why = ""
            if ys and max(ys) / min(ys) > LOG_SPAN:
                ax.set_yscale("log")
                why = f"log y: figures span {max(ys) / min(ys):.0f}×"
            else:
                ax.set_ylim(bottom=0)  # linear axes start at zero
            ax.grid(True, alpha=0.3)
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{mode} ({shown_unit})" if shown_unit else mode)
            fixed = fixed_parameters(cell, x_name)
            ax.set_title(textwrap.fill(f"fixed: {fixed}" if fixed else "", 60) + (f"\n{why}" if why else ""),
                         fontsize=7)
    quick = is_quick(group)
    title = (("QUICK CHECK (small shapes, few rounds: not results) — " if quick else "")
             + f"{op}: {metric.replace('_', ' ')}" + (" (median; band / bars p20–p80)" if unit == "s" else ""))
    fig.suptitle(title + "\n" + conditions(group), fontsize=8)
    bottom = (0.5 + 0.17 * note_lines) / height
    fig.legend(list(labels_seen.values()), list(labels_seen), loc="lower center", ncol=min(6, len(labels_seen)),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, bottom - 0.35 / height))
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=6.5, va="bottom", ha="left", family="monospace",
                 color="darkred" if any(not w.explanation for w in warnings) else "0.25")
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.75 / height))
    path = plot_dir / f"{op}-{metric}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    _shrink_png(path)
    return path


def _shrink_png(path: Path) -> None:
    """Re-save the plot with a 64-colour palette (a few times smaller; Pillow comes with matplotlib)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


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
