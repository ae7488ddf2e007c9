"""The PNG plots of a results CSV (see ``benchmarks.render``, which calls :func:`plot`): one per op and metric,
one panel per mode and swept variable, a line per provider, the p20–p80 band shaded, sanity warnings under the
figure. matplotlib is imported only to draw.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import sanity
from .presentation import METRIC_ORDER, MODE_ORDER, NOT_PLOTTED, UNIT_SCALE, conditions, with_figures, is_quick, label, \
    number, ordered


def plot(rows: list[dict[str, Any]], plot_dir: Path, warnings: list | None = None) -> list[Path]:
    """One PNG per (op, metric) of ``rows``; returns their paths. ``warnings``: sanity warnings drawn under
    the figure of their op and metric (default: :func:`benchmarks.sanity.check` of ``rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if warnings is None:
        warnings = sanity.check(rows)
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures = [r for r in with_figures(rows) if r["metric"] not in NOT_PLOTTED]
    paths = []
    for op in dict.fromkeys(r["op"] for r in figures):
        op_rows = [r for r in figures if r["op"] == op]
        for metric in ordered((r["metric"] for r in op_rows), METRIC_ORDER):
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


def _plot_group(plt, op: str, metric: str, group: list[dict[str, Any]], plot_dir: Path, warnings: list) -> Path:
    import textwrap

    modes = ordered((r["mode"] for r in group), MODE_ORDER)
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
            numeric = all(number(x) is not None for x in xs_raw) and len(xs_raw) > 1
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
