"""Policy ``"layers"``: only a set of decoder layers trains; nothing below the lowest one is backpropagated.

Arguments (exactly one of):
    layers: decoder-layer indices (an int, a ``range`` or a list; negative indices count from the top,
        as in Python: ``range(-2, 0)`` is the two top layers).
    budget: a fraction in (0, 1]: the top ``ceil(budget * n_layers)`` layers.

Every candidate parameter inside the chosen layers trains; every other candidate — the other layers, and
the embeddings, final norm and lm_head outside the layer stack — is frozen. The backward is cut at the
input of the lowest chosen layer (:mod:`fastft.policies.cut`).
"""
from __future__ import annotations

import math
from typing import Any

from .context import Choice, Context


def normalize_layers(layers: Any, n_layers: int) -> list[int]:
    """Sorted, deduplicated, non-negative layer indices; ValueError naming the problem."""
    if isinstance(layers, bool):
        raise ValueError(f"layers={layers!r}: use an int, a range or a list of decoder-layer indices.")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, range):
        layers = list(layers)
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers={layers!r}: use an int, a range or a list of decoder-layer indices.")
    if not layers:
        raise ValueError("layers is empty: name at least one decoder layer (e.g. layers=range(-2, 0)).")
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(
            f"layers={list(layers)}: the model has {n_layers} decoder layers (indices 0..{n_layers - 1}, or "
            f"-{n_layers}..-1 from the top); {bad} do not exist."
        )
    return sorted({i % n_layers for i in layers})


def check(budget: float | None, options: dict, n_layers: int) -> None:
    layers = options.get("layers")
    if (layers is None) == (budget is None):
        raise ValueError(
            "policy 'layers' takes exactly one of layers=... (decoder-layer indices, e.g. range(-2, 0)) or "
            "budget=... (the top fraction of the layers, in (0, 1])."
        )
    if n_layers == 0:
        raise ValueError("policy 'layers' needs a stack of decoder layers, and this model has none.")
    if layers is not None:
        normalize_layers(layers, n_layers)


def choose(ctx: Context) -> Choice:
    n = ctx.n_layers
    if ctx.options.get("layers") is not None:
        layers = normalize_layers(ctx.options["layers"], n)
    else:
        count = max(1, math.ceil(ctx.budget * n - 1e-9))
        layers = list(range(n - count, n))
    chosen = set(layers)
    selected = [j for j, layer in enumerate(ctx.layer_of) if layer in chosen]
    notes = [f"training decoder layers {layers}"]
    if not selected:
        raise ValueError(
            f"layers {layers} hold no trainable parameter (the candidates are the parameters that require "
            "grad; on a patched model, the adapters)."
        )
    return Choice(selected, notes=notes)
