"""Sanity checks the suite applies to a run's rows: printed as warnings, drawn under the figures, and fatal
with ``--strict``.

Each check names figures a careful reader would reject, and why:

``falls_with_work``  time falls as the work grows (tokens, hidden, rank, ...) by more than the spread: the
                     smaller point was disturbed (a cold process, another process) or the sweep changed
                     something else between its points;
``step_sum``         a step is not about its forward + its backward (each timed alone): 0.67×–1.5×, beyond
                     the spread;
``noisy``            the two halves of a case's rounds disagreed, and again when it was re-measured;
``floor``            a provider is slower than the floor (e.g. the frozen layer alone) by more than its
                     extra FLOPs allow: ``t / t_floor > 1.5 · FLOPs / FLOPs_floor``, beyond the spread.

A warning is *explained* when the case ran on a loaded machine (the 1-minute load average above the
core count: other processes took CPU time; the explanation says how much) or when :data:`EXPLANATIONS`
knows the cause for that op and check. ``--strict`` fails on unexplained warnings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

WORK_AXES = ("tokens", "hidden", "rank", "d", "vocab", "seq", "batch", "intermediate", "layers")
STEP_SUM_RANGE = (0.67, 1.5)
FLOOR_FACTOR = 1.5

# Known causes, by (op, check): shown beside the warning on the plot and in the summary.
EXPLANATIONS = {
    ("lora", "floor"): "a LoRA layer adds two skinny GEMMs, an autograd node and Python per pass to the frozen "
                       "GEMM; at small shapes that fixed host cost dominates (see host_overhead)",
    ("qlora", "floor"): "the 4-bit base is dequantized on every pass (forward and backward), work the FLOP "
                        "counter does not see; PEFT's bitsandbytes path does the same",
    ("dora", "floor"): "DoRA adds the row norms of W + B·A (an out×in pass over W) to LoRA; PEFT builds the "
                       "full out×in matrix on every forward (the cost fastft removes)",
    ("qdora", "floor"): "DoRA over a 4-bit base dequantizes W for the row norms too (not counted as FLOPs)",
    ("host_overhead", "floor"): "this benchmark measures exactly that: the fixed host cost per call of a "
                                "patched layer at 1-64 tokens",
    ("host_overhead", "falls_with_work"): "at 1-64 tokens the time is host cost, flat in the token count: a "
                                          "dip within a few µs is scheduling noise",
    ("s2ft", "floor"): "LoRA (the peer) adds two skinny GEMMs and their host cost to the frozen GEMM",
    # by (op, check, provider): a peer whose cause differs from its op's
    ("s2ft", "floor", "peft-shira"): "PEFT SHiRA copies the whole weight and adds its sparse delta on every "
                                     "forward (out×in elementwise work, not counted as FLOPs), then forms the "
                                     "full weight gradient",
    ("lora", "floor", "torch.compile"): "the compiled LoRA runs inductor's generated code for the two skinny "
                                        "GEMMs and their elementwise glue, plus the compiled graph's host cost",
    ("fake_quant_weight", "floor"): "fake quantization is elementwise work (no FLOPs counted)",
    ("moe_lora", "floor"): "LoRA's rank-16 products run far below the frozen GEMMs' rate on a CPU (one expert's "
                           "64-row segment, bfloat16, measured 2026-12-07: 303 GFLOP/s for x·W, about 50 for x·Aᵀ "
                           "and (x·Aᵀ)·Bᵀ), and the segment loop issues 3 GEMM calls per expert and projection where "
                           "the frozen experts issue one grouped call; PEFT and the compiled peer pay the same products",
    ("moe_dora", "floor"): "besides LoRA's skinny products (see moe_lora), DoRA on experts forms the row norms of every "
                           "expert's W + s·B·A on each call: a float32 pass over all experts' weights (W·Aᵀ, "
                           "memory-bound: 2-3 ms per projection here, measured 2026-12-07), whatever the routing",
    ("linear_ce", "step_sum"): "the fused loss computes its gradients in its forward; its backward only scales "
                               "them (not timed alone)",
}


@dataclass
class Warning:
    op: str
    check: str
    metric: str
    mode: str
    x_name: str
    provider: str
    message: str
    explanation: str | None = None

    def text(self) -> str:
        why = f" — explained: {self.explanation}" if self.explanation else " — UNEXPLAINED"
        return f"[{self.check}] {self.op} {self.mode} {self.provider}: {self.message}{why}"


def _label(row: dict[str, Any]) -> str:
    if row["role"] == "fastft":
        return f"{row['provider']}[{row['backend']}]"
    if row["role"] == "floor":
        return f"{row['provider']} (floor)"
    return row["provider"]


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _cores(row: dict[str, Any]) -> int | None:
    match = re.search(r"\((\d+) cores", row.get("processor") or "")
    return int(match.group(1)) if match else None


def load_explanation(rows: Iterable[dict[str, Any]]) -> str | None:
    """'loaded machine' when any of ``rows`` ran with a 1-minute load average above the core count."""
    rows = list(rows)
    loads = [v for r in rows for v in (r.get("load_start"), r.get("load_avg")) if v is not None]
    cores = next((c for r in rows if (c := _cores(r))), None)
    if not loads or cores is None or max(loads) <= cores:
        return None
    return (f"the machine was loaded while it ran (1-minute load average {min(loads):.1f}–{max(loads):.1f} on "
            f"{cores} cores): other processes took CPU time; re-run on a quiet machine")


def _explain(op: str, check: str, rows: list[dict[str, Any]]) -> str | None:
    provider = rows[0].get("provider") if rows else None
    known = (EXPLANATIONS.get((op, check, provider)) or EXPLANATIONS.get((op, check))
             or EXPLANATIONS.get((op.split("-")[0], check)))
    load = load_explanation(rows)
    return "; ".join(t for t in (known, load) if t) or None


def check(rows: list[dict[str, Any]]) -> list[Warning]:
    """Every warning of ``rows`` (one run's figures; skipped and failed rows are ignored)."""
    times = [r for r in rows if r["metric"] == "time" and r["p50"] is not None and r["role"] != "estimate"
             and r["x_name"] != "step"]
    out: list[Warning] = []
    out += _falls_with_work(times)
    out += _step_sum(times)
    out += _noisy(times)
    out += _floor(times, [r for r in rows if r["metric"] == "flops" and r["p50"] is not None])
    return out


def _falls_with_work(times):
    out = []
    groups: dict[tuple, list] = {}
    for r in times:
        if r["x_name"] in WORK_AXES and _num(r["x_value"]) is not None:
            groups.setdefault((r["op"], r["mode"], _label(r), r["x_name"]), []).append(r)
    for (op, mode, label, x_name), group in groups.items():
        by_x = {}
        for r in group:
            by_x[_num(r["x_value"])] = r  # later rows win
        xs = sorted(by_x)
        for small, big in zip(xs, xs[1:]):
            a, b = by_x[small], by_x[big]
            if b["p50"] < a["p50"] / 1.1 and (b["p80"] or b["p50"]) < (a["p20"] or a["p50"]):
                out.append(Warning(op, "falls_with_work", "time", mode, x_name, label,
                                   f"time falls as {x_name} grows: {x_name}={a['x_value']} {_ms(a['p50'])} → "
                                   f"{x_name}={b['x_value']} {_ms(b['p50'])} (bands do not overlap)",
                                   _explain(op, "falls_with_work", [a, b])))
    return out


def _step_sum(times):
    out = []
    cells: dict[tuple, dict[str, dict]] = {}
    for r in times:
        cells.setdefault((r["op"], r["config"], _label(r)), {})[r["mode"]] = r
    seen = set()
    for (op, config, label), modes in cells.items():
        if not {"forward", "backward", "step"} <= set(modes) or (op, config, label) in seen:
            continue
        seen.add((op, config, label))
        f, b, s = modes["forward"], modes["backward"], modes["step"]
        expected = f["p50"] + b["p50"]
        lo, hi = STEP_SUM_RANGE
        ratio = s["p50"] / expected if expected > 0 else 1.0
        outside_band = s["p20"] > hi * (f["p80"] + b["p80"]) or s["p80"] < lo * (f["p20"] + b["p20"])
        if (ratio < lo or ratio > hi) and outside_band:
            out.append(Warning(op, "step_sum", "time", "step", s["x_name"], label,
                               f"step {_ms(s['p50'])} is {ratio:.2f}× forward {_ms(f['p50'])} + backward "
                               f"{_ms(b['p50'])} at {config}", _explain(op, "step_sum", [f, b, s])))
    return out


def _noisy(times):
    out, seen = [], set()
    for r in times:
        if "noisy:" in (r.get("note") or "") and (r["op"], r["config"], _label(r), r["mode"]) not in seen:
            seen.add((r["op"], r["config"], _label(r), r["mode"]))
            why = r["note"].split("noisy:", 1)[1].strip()
            out.append(Warning(r["op"], "noisy", "time", r["mode"], r["x_name"], _label(r),
                               f"repeated runs disagree at {r['config']}: {why}", _explain(r["op"], "noisy", [r])))
    return out


def _floor(times, flops):
    out, seen = [], set()
    flop_of = {(r["op"], r["config"], r["mode"], _label(r)): r["p50"] for r in flops}
    cells: dict[tuple, list] = {}
    for r in times:
        cells.setdefault((r["op"], r["config"], r["mode"]), []).append(r)
    for (op, config, mode), group in cells.items():
        floors = [r for r in group if r["role"] == "floor"]
        if not floors:
            continue
        floor = floors[0]
        f_floor = flop_of.get((op, config, mode, _label(floor)))
        if not f_floor:
            continue
        for r in group:
            if r["role"] == "floor" or (op, config, mode, _label(r)) in seen:
                continue
            f = flop_of.get((op, config, mode, _label(r)))
            if f is None:
                continue
            allowed = FLOOR_FACTOR * max(f / f_floor, 1.0)
            if r["p20"] > allowed * floor["p80"]:
                seen.add((op, config, mode, _label(r)))
                out.append(Warning(op, "floor", "time", mode, r["x_name"], _label(r),
                                   f"{_ms(r['p50'])} is {r['p50'] / floor['p50']:.1f}× the floor {_label(floor)} "
                                   f"({_ms(floor['p50'])}) at {config}, its FLOPs only {f / f_floor:.2f}×",
                                   _explain(op, "floor", [r, floor])))
    return out
