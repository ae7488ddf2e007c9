"""Finding the modules a config targets: the decoder-layer stack, name suffixes, regexes, layer indices.

Matching rules (PEFT's, so a target list carries over):
  - ``"all-linear"``: every linear layer (``nn.Linear`` or bitsandbytes ``Linear4bit``) inside the decoder
    layers (encoder layers for BERT-style models: ``encoder.layer``); never ``lm_head``, embeddings, a pooler
    or a classification head (PEFT's ``"all-linear"`` also takes a BERT pooler: name it to match).
  - a list of suffixes: a module matches a suffix when its qualified name equals it or ends with
    ``"." + suffix``.
  - any other string: a regular expression that must match the whole qualified name.
``layers`` keeps only modules inside the listed decoder layers (modules outside the stack, such as
``lm_head``, are kept when named explicitly).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from .bnb import is_linear4bit
from .config import ALL_LINEAR


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_linear4bit(module)


@dataclass
class LayerStack:
    """The repeated blocks of a model (``model.layers``, ``encoder.layer``): a prefix and a count."""

    prefix: str
    blocks: nn.ModuleList

    def index_of(self, name: str) -> int | None:
        """Block index of a module's qualified name, or None when it lies outside the stack."""
        head = self.prefix + "." if self.prefix else ""
        if not name.startswith(head):
            return None
        first = name[len(head):].split(".", 1)[0]
        return int(first) if first.isdigit() else None


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    """The ``nn.ModuleList`` holding the most linear layers: the decoder (or encoder) layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(1 for m in module.modules() if is_linear(m))
            if count > best_count:
                best, best_count = LayerStack(name, module), count
    return best


def _leaf_names(model: nn.Module, accept: Callable[[nn.Module], bool]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and accept(m)})


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    layers: Sequence[int] | None = None,
    accept: Callable[[nn.Module], bool] = is_linear,
    what: str = "linear layer",
) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs a config targets, in model order.

    Raises ``ValueError`` naming the problem: a suffix or regex that matches nothing (listing the names
    that exist), a match that ``accept`` refuses, layer indices outside the stack, or an empty result.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    stack = find_layer_stack(model)
    if layers is not None:
        if stack is None:
            raise ValueError("layers=... was given but this model has no stack of decoder layers (nn.ModuleList).")
        missing = [i for i in layers if i >= len(stack.blocks)]
        if missing:
            raise ValueError(
                f"layers={list(layers)}: the model has {len(stack.blocks)} layers under '{stack.prefix}' "
                f"(indices 0..{len(stack.blocks) - 1}); {missing} do not exist."
            )

    if targets == ALL_LINEAR:
        if stack is None:
            raise ValueError(
                "targets='all-linear' found no stack of decoder layers in this model; name the modules instead, "
                f"e.g. targets={_leaf_names(model, accept)[:4]}."
            )
        chosen = [(n, m) for n, m in named if stack.index_of(n) is not None and accept(m)]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [(n, m) for n, m in named if pattern.fullmatch(n)]
        if not chosen:
            hint = ""
            if re.fullmatch(r"[\w.]+", targets):
                hint = f" To match by name suffix, pass a list: targets=[{targets!r}]."
            raise ValueError(
                f"targets={targets!r} (a regular expression over qualified module names) matches no module.{hint} "
                f"Names of {what}s in this model: {_leaf_names(model, accept)}."
            )
    else:
        chosen, seen = [], set()
        for suffix in targets:
            hits = [(n, m) for n, m in named if n == suffix or n.endswith("." + suffix)]
            if not hits:
                raise ValueError(
                    f"target {suffix!r} matches no module in {type(model).__name__}. "
                    f"Names of {what}s in this model: {_leaf_names(model, accept)}."
                )
            for n, m in hits:
                if n not in seen:
                    seen.add(n)
                    chosen.append((n, m))
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen.sort(key=lambda item: order[item[0]])

    refused = [(n, m) for n, m in chosen if not accept(m)]
    if refused:
        n, m = refused[0]
        raise ValueError(
            f"target matches '{n}' ({type(m).__name__}), which is not a {what}; "
            f"names of {what}s in this model: {_leaf_names(model, accept)}."
        )
    if layers is not None:
        keep = set(layers)
        chosen = [(n, m) for n, m in chosen if stack.index_of(n) is None or stack.index_of(n) in keep]
    if not chosen:
        raise ValueError(f"targets={targets!r} with layers={layers} selects no {what}.")
    return chosen
