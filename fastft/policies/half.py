"""Policy ``"half"``: Half Fine-Tuning (HFT) — in each decoder layer freeze a random half of the matrices.

In every decoder layer the weight matrices are grouped by the sub-block holding them (``self_attn``:
q/k/v/o; ``mlp``: gate/up/down), and in each group a seeded random half is frozen. A *matrix* is a linear
layer (its weight and bias go together) or, on a fastft-patched model, a fastft module (its adapter
parameters go together: on a LoRA model the choice is which LoRA layers train). Odd counts alternate:
⌊n/2⌋ frozen in even layers, ⌈n/2⌉ in odd layers (an FFN of 3 matrices freezes 1, 2, 1, 2, ... so half of
them overall). Candidates that are no matrix (norm weights) and those outside the layers (embeddings,
final norm, lm_head) keep training. ``budget`` is not taken; ``seed`` fixes the choice: the same seed on the
same architecture freezes the same matrices.
"""
from __future__ import annotations

import random

from torch import nn

from ..nn import FASTFT_MODULES
from ..targets import is_linear
from .context import Choice, Context


def check(budget, options: dict, n_layers: int) -> None:
    if budget is not None:
        raise ValueError("policy 'half' freezes half of each layer's matrices and takes no budget; drop budget=.")
    if n_layers == 0:
        raise ValueError("policy 'half' needs a stack of decoder layers, and this model has none.")


def _is_matrix(module: nn.Module) -> bool:
    return isinstance(module, FASTFT_MODULES) or is_linear(module)


def matrix_groups(ctx: Context) -> dict[int, dict[str, dict[str, list[int]]]]:
    """layer -> sub-block -> matrix module name -> candidate indices, in model order."""
    groups: dict[int, dict[str, dict[str, list[int]]]] = {}
    modules = dict(ctx.model.named_modules())
    head = ctx.stack.prefix + "." if ctx.stack.prefix else ""
    for j, (name, _) in enumerate(ctx.candidates):
        layer = ctx.layer_of[j]
        if layer is None:
            continue
        parts = name.split(".")[:-1]
        unit = None
        for end in range(len(parts), 0, -1):  # outermost matrix wins (a fastft module over its base layer)
            candidate = ".".join(parts[:end])
            if _is_matrix(modules[candidate]):
                unit = candidate
        if unit is None:
            continue
        inside = unit[len(head):].split(".")  # ["3", "self_attn", "q_proj"]
        block = inside[1] if len(inside) > 2 else "(layer)"
        groups.setdefault(layer, {}).setdefault(block, {}).setdefault(unit, []).append(j)
    return groups


def choose(ctx: Context) -> Choice:
    rng = random.Random(ctx.seed)
    frozen: set[int] = set()
    summary = []
    groups = matrix_groups(ctx)
    for layer in sorted(groups):
        for units in groups[layer].values():
            names = list(units)
            count = len(names) // 2 if layer % 2 == 0 else (len(names) + 1) // 2
            for unit in rng.sample(names, count):
                frozen.update(units[unit])
            summary.append(f"{len(names) - count}/{len(names)}")
    if not groups:
        raise ValueError("policy 'half' found no trainable matrix inside the decoder layers.")
    selected = [j for j in ctx.all_candidates() if j not in frozen]
    notes = [f"seed {ctx.seed}: per layer and sub-block, matrices trained: {', '.join(summary)}"]
    return Choice(selected, notes=notes)
