"""GreenTrainer's selection problem and an exact dynamic programme for it.

Candidates j = 0..n-1 (weight tensors) have an importance v_j and a place in the backward: ``group_j``,
the *effective depth* at which the backward must arrive when j is the deepest tensor chosen (its position
in the forward, or the input of its layer under reentrant checkpointing). Choosing a set S whose deepest
group is e = min_{j∈S} group_j costs

    cost(S) = A(e) + Σ_{j∈S} ( w_j + Σ_{(c, t) ∈ conds_j, t < e} c )
    A(e)    = Σ_{(c, t) ∈ shared, t ≥ e} c  +  Σ_j Σ_{(c, t) ∈ conds_j, t ≥ e} c

- ``w_j``: FLOPs only j needs (its weight gradient);
- ``shared``: activation-gradient products every tensor at depth ≤ t needs (the dX of the layers above);
  the backward pays them once it must reach depth e ≤ t;
- ``conds_j``: products needed when j is chosen *or* the backward reaches depth ≤ t, whoever is chosen
  (LoRA's g·B, which both dA and dX use): j pays them only while the backward stops above t.

The programme: for each depth e (top first), a 0/1 knapsack over the candidates above e plus at least one
of the candidates at e, with capacity ``capacity - A(e)``; the best over all e wins. Knapsack weights are
integers: FLOPs divided by their greatest common divisor when that leaves at most ``max_bins`` units
(then the optimum is exact), otherwise rounded up to units of ``ceil(capacity / max_bins)`` FLOPs (the
result then always fits the capacity, and is optimal for the rounded weights).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SelectionProblem:
    values: list[float]
    weights: list[int]
    groups: list[int]
    capacity: int
    conds: list[list[tuple[int, int]]] = field(default_factory=list)
    shared: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.values)
        if not self.conds:
            self.conds = [[] for _ in range(n)]
        if not (len(self.weights) == len(self.groups) == len(self.conds) == n):
            raise ValueError("values, weights, groups and conds must have one entry per candidate")

    def depth_cost(self, e: int) -> int:
        return sum(c for c, t in self.shared if t >= e) + sum(c for conds in self.conds for c, t in conds if t >= e)

    def weight_at(self, j: int, e: int) -> int:
        return self.weights[j] + sum(c for c, t in self.conds[j] if t < e)

    def cost(self, chosen) -> int:
        chosen = list(chosen)
        if not chosen:
            return 0
        e = min(self.groups[j] for j in chosen)
        return self.depth_cost(e) + sum(self.weight_at(j, e) for j in chosen)

    def value(self, chosen) -> float:
        return float(sum(self.values[j] for j in chosen))


def _units(problem: SelectionProblem, max_bins: int) -> tuple[int, bool]:
    """FLOPs per knapsack unit, and whether the weights are exact multiples of it."""
    numbers = [*problem.weights, *(c for conds in problem.conds for c, _ in conds),
               *(c for c, _ in problem.shared)]
    g = 0
    for number in numbers:
        g = math.gcd(g, int(number))
    if g == 0:
        return 1, True
    if problem.capacity // g <= max_bins:
        return g, True
    return max(1, -(-problem.capacity // max_bins)), False


def _add(table: np.ndarray, weight: int, value: float) -> np.ndarray:
    """0/1 knapsack step: ``table[c]`` = best value with weight <= c."""
    if weight >= len(table):
        return table
    out = table.copy()
    if weight == 0:
        return np.maximum(out, table + value)
    np.maximum(out[weight:], table[:-weight] + value, out=out[weight:])
    return out


def _add_forced(free: np.ndarray, forced: np.ndarray, weight: int, value: float) -> np.ndarray:
    """Step of the 'at least one member' table: take this member on top of either table."""
    out = forced.copy()
    if weight >= len(free):
        return out
    best = np.maximum(free, forced)
    if weight == 0:
        return np.maximum(out, best + value)
    np.maximum(out[weight:], best[:-weight] + value, out=out[weight:])
    return out


@dataclass
class Solution:
    chosen: list[int]
    value: float
    cost: int
    exact: bool


def solve(problem: SelectionProblem, max_bins: int = 1 << 16) -> Solution:
    """The set maximising Σ values subject to ``cost <= capacity`` (see the module docstring).

    Returns an empty choice when no single candidate fits.
    """
    n = len(problem.values)
    unit, exact = _units(problem, max_bins)

    def units_of(flops: int) -> int:
        return flops // unit if exact else -(-flops // unit)

    bins = problem.capacity // unit + 1
    depths = sorted({problem.groups[j] for j in range(n)}, reverse=True)
    settled = np.zeros(bins)
    settled_items: set[int] = set()
    pending: list[int] = []
    best = (0.0, None)  # (value, depth)
    for e in depths:
        room = problem.capacity - problem.depth_cost(e)
        members = [j for j in range(n) if problem.groups[j] == e]
        still = []
        for j in pending:  # settle candidates that no longer pay any conditional product
            if all(t >= e for _, t in problem.conds[j]):
                settled = _add(settled, units_of(problem.weight_at(j, e)), problem.values[j])
                settled_items.add(j)
            else:
                still.append(j)
        pending = still
        if room >= 0:
            free = settled
            for j in pending:
                free = _add(free, units_of(problem.weight_at(j, e)), problem.values[j])
            forced = np.full(bins, -np.inf)
            for j in members:
                forced = _add_forced(free, forced, units_of(problem.weight_at(j, e)), problem.values[j])
            value = forced[room // unit]
            if np.isfinite(value) and (best[1] is None or value > best[0]):
                best = (float(value), e)
        pending.extend(members)
    if best[1] is None:
        return Solution([], 0.0, 0, exact)
    chosen = _reconstruct(problem, best[1], unit, units_of, bins)
    return Solution(sorted(chosen), problem.value(chosen), problem.cost(chosen), exact)


def _reconstruct(problem: SelectionProblem, e: int, unit: int, units_of, bins: int) -> list[int]:
    """Re-run the knapsack for depth ``e`` keeping each decision, then walk back from the capacity."""
    n = len(problem.values)
    above = [j for j in range(n) if problem.groups[j] > e]
    members = [j for j in range(n) if problem.groups[j] == e]
    tables = [np.zeros(bins)]
    for j in above:
        tables.append(_add(tables[-1], units_of(problem.weight_at(j, e)), problem.values[j]))
    free = tables[-1]
    forced_tables = [np.full(bins, -np.inf)]
    for j in members:
        forced_tables.append(_add_forced(free, forced_tables[-1], units_of(problem.weight_at(j, e)), problem.values[j]))
    c = (problem.capacity - problem.depth_cost(e)) // unit
    chosen = []
    in_forced = True  # walking the 'at least one member' tables
    for k in range(len(members) - 1, -1, -1):
        j = members[k]
        if forced_tables[k + 1][c] == forced_tables[k][c]:
            continue  # member j not taken
        chosen.append(j)
        c -= units_of(problem.weight_at(j, e))
        # j was taken on top of the forced table (more members) or of the free table (no member below j)
        if forced_tables[k][c] < free[c]:
            in_forced = False
            break
    if in_forced:
        raise AssertionError("knapsack reconstruction lost its way (no member taken)")
    for k in range(len(above) - 1, -1, -1):
        if tables[k + 1][c] != tables[k][c]:
            j = above[k]
            chosen.append(j)
            c -= units_of(problem.weight_at(j, e))
    return chosen


def brute_force(problem: SelectionProblem) -> tuple[float, list[int]]:
    """The best value over all subsets (for tests on small instances)."""
    n = len(problem.values)
    best = (0.0, [])
    for size in range(1, n + 1):
        for chosen in itertools.combinations(range(n), size):
            if problem.cost(chosen) <= problem.capacity:
                value = problem.value(chosen)
                if value > best[0]:
                    best = (value, list(chosen))
    return best
