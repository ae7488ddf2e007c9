"""Finding the modules a config targets: the layer stacks, name suffixes, regexes, layer indices.

A *layer stack* is an outermost ``nn.ModuleList`` holding linear layers: the decoder layers, the encoder
layers (BERT's ``encoder.layer``), both stacks of an encoder–decoder (T5's ``encoder.block`` and
``decoder.block``, with self- and cross-attention), a vision tower's layers. A ``ModuleList`` inside a stack's
block (T5's ``block.N.layer``, a list of per-expert MLPs) is part of that block, not a stack of its own.

Matching rules (PEFT's, so a target list carries over):
  - ``"all-linear"``: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes ``Linear4bit``)
    inside every layer stack; never the output embedding (``lm_head``), embeddings, a pooler, a projector
    between towers or a task head, which live outside the stacks (PEFT's ``"all-linear"`` takes every linear
    but the output embedding, so it also takes a BERT pooler or a multimodal projector: name them to match).
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


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored in×out (``nx``×``nf``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def out_in_weight(layer: nn.Module):
    """A linear layer's weight as out×in: ``nn.Linear``'s own, a ``Conv1D``'s transposed view (no copy; writing
    into the view writes the layer's weight)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear``, ``Linear4bit`` or ``Conv1D``."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def is_fused_experts(module: nn.Module) -> bool:
    """A MoE experts module holding its experts as 3-D parameters (transformers 5: ``gate_up_proj``, ``down_proj``
    of shape experts×out×in), which are not ``nn.Linear`` modules: a module with a 3-D parameter of its own whose
    class name says experts, or that has ``num_experts``, or whose 3-D parameter has an expert projection's name."""
    if not any(p.dim() == 3 for p in module.parameters(recurse=False)):
        return False  # a depthwise convolution's 3-D kernel (ConvBERT) is not an experts module
    names = {n for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    return "expert" in type(module).__name__.lower() or hasattr(module, "num_experts") or bool(
        names & {"gate_up_proj", "up_proj", "down_proj", "gate_proj"})


def is_router(module: nn.Module) -> bool:
    """A MoE router that is not an ``nn.Linear`` (transformers 5's ``*TopKRouter`` / ``*Router`` classes): a module
    named a router holding a 2-D ``weight`` (experts × hidden) of its own and no 3-D parameter."""
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return ("router" in type(module).__name__.lower() and weight is not None and weight.dim() == 2
            and not is_linear(module) and not is_fused_experts(module))


def parameter_targets(module: nn.Module) -> list[str]:
    """The parameters of ``module`` a target may name (PEFT's ``target_parameters``): a fused experts module's 3-D
    projections, a router's ``weight``."""
    if is_fused_experts(module):
        return [p for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
    if is_router(module):
        return ["weight"]
    return []


def is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) and "router" in type(module).__name__.lower() \
            and type(module).forward is not nn.Linear.forward:
        return False  # a router subclassing nn.Linear with its own forward (Phimoe): is_router's, not a linear
    return isinstance(module, nn.Linear) or is_linear4bit(module) or is_conv1d(module)


# nn.Linear subclasses whose own forward is F.linear written out (x @ W.T + b): a LoRA wrapper reproduces them
PLAIN_LINEAR_SUBCLASSES = frozenset({"FalconLinear"})


def forward_of_its_own(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass overriding ``forward`` with something fastft cannot assume is ``F.linear``
    (DeepSeek-V4's grouped bmm projection): swapping it for a layer that calls ``F.linear`` would change the model."""
    cls = type(module)
    return (isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward and not is_linear4bit(module)
            and not cls.__module__.startswith("bitsandbytes") and cls.__name__ not in PLAIN_LINEAR_SUBCLASSES)


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


def find_layer_stacks(model: nn.Module) -> list[LayerStack]:
    """Every outermost ``nn.ModuleList`` holding linear layers, in model order (see the module docstring)."""
    stacks: list[LayerStack] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(s.prefix + ".") for s in stacks):
            continue  # inside a block of an outer stack
        if any(is_linear(m) for m in module.modules()):
            stacks.append(LayerStack(name, module))
    return stacks


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    """The layer stack holding the most linear layers: the decoder (or encoder) layers."""
    best, best_count = None, 0
    for stack in find_layer_stacks(model):
        count = sum(1 for m in stack.blocks.modules() if is_linear(m))
        if count > best_count:
            best, best_count = stack, count
    return best


def stack_of(stacks: Sequence[LayerStack], name: str) -> tuple[LayerStack, int] | None:
    """The stack a qualified module name lies in and its block index there, or None."""
    for stack in stacks:
        index = stack.index_of(name)
        if index is not None:
            return stack, index
    return None


def output_embedding_names(model: nn.Module) -> set[str]:
    """Qualified names of the model's output embedding (``lm_head``), which ``"all-linear"`` never takes."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        out = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        out = None
    if out is None:
        return set()
    return {name for name, m in model.named_modules() if m is out}


def describe_stacks(model: nn.Module, names: Sequence[str]) -> list[str]:
    """One line per layer stack: how many of ``names`` it holds, and their leaf names (for the patch report)."""
    stacks = find_layer_stacks(model)
    lines = []
    for stack in stacks:
        inside = [n for n in names if stack.index_of(n) is not None]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in inside})
        lines.append(
            f"stack '{stack.prefix}' ({len(stack.blocks)} blocks): {len(inside)} modules"
            + (f" ({', '.join(leaves)})" if leaves else "")
        )
    outside = [n for n in names if stack_of(stacks, n) is None]
    if outside:
        lines.append(f"outside the stacks: {', '.join(outside)}")
    return lines


def _leaf_names(model: nn.Module, accept: Callable[[nn.Module], bool]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and accept(m)})


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    layers: Sequence[int] | None = None,
    accept: Callable[[nn.Module], bool] = is_linear,
    what: str = "linear layer",
    expert_params: dict[str, list[str]] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs a config targets, in model order.

    A fused MoE experts module is chosen by ``"all-linear"`` (all its 3-D projections, as PEFT does on load) or
    when a target names one of its 3-D parameters (``"mlp.experts.down_proj"``); ``expert_params`` then collects,
    per experts module, the parameter names a target named. A MoE router that is not an ``nn.Linear``
    (:func:`is_router`) is chosen by ``"all-linear"`` (PEFT adapts ``gate.weight`` there for the Mixtral- and
    Qwen2-MoE-style models it converts), by its module name (``"mlp.gate"``) or its parameter
    (``"mlp.gate.weight"``). ``accept`` decides whether such a module is refused.

    Raises ``ValueError`` naming the problem: a suffix or regex that matches nothing (listing the names
    that exist), a match that ``accept`` refuses, layer indices outside the stack, or an empty result.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    stacks = find_layer_stacks(model)
    if layers is not None:
        if not stacks:
            raise ValueError("layers=... was given but this model has no stack of layers (nn.ModuleList).")
        deepest = max(len(s.blocks) for s in stacks)
        missing = [i for i in layers if i >= deepest]
        if missing:
            sizes = ", ".join(f"{len(s.blocks)} layers under '{s.prefix}'" for s in stacks)
            raise ValueError(
                f"layers={list(layers)}: the model has {sizes} (indices 0..{deepest - 1}); {missing} do not exist."
            )

    if targets == ALL_LINEAR:
        if not stacks:
            raise ValueError(
                f"targets='all-linear' found no stack of layers in {type(model).__name__} (an nn.ModuleList of "
                "blocks holding nn.Linear / Conv1D / Linear4bit layers); name the modules instead, "
                f"e.g. targets={_leaf_names(model, accept)[:4]}."
            )
        heads = output_embedding_names(model)
        chosen = [(n, m) for n, m in named
                  if stack_of(stacks, n) is not None and (is_linear(m) or is_fused_experts(m) or is_router(m)) and n not in heads]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [(n, m) for n, m in named if pattern.fullmatch(n)]
        for n, m in named:
            hit = [p for p in parameter_targets(m) if pattern.fullmatch(f"{n}.{p}")]
            if hit and not pattern.fullmatch(n):
                chosen.append((n, m))
                if expert_params is not None and is_fused_experts(m):
                    expert_params.setdefault(n, []).extend(hit)
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
            for n, m in named:  # a fused experts / router parameter named by suffix (PEFT's target_parameters)
                hit = [p for p in parameter_targets(m) if f"{n}.{p}" == suffix or f"{n}.{p}".endswith("." + suffix)]
                if hit:
                    hits.append((n, m))
                    if expert_params is not None and is_fused_experts(m):
                        expert_params.setdefault(n, []).extend(hit)
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
    own = [(n, m) for n, m in chosen if is_linear(m) and forward_of_its_own(m)]
    if own:
        n, m = own[0]
        raise ValueError(
            f"target matches '{n}' ({type(m).__name__}), an nn.Linear subclass with a forward of its own, which "
            "fastft's layers (they call F.linear) would not reproduce; leave it out of targets (name the other "
            f"modules, e.g. {[x for x in _leaf_names(model, accept) if x != n.rsplit('.', 1)[-1]][:4]})."
        )
    if layers is not None:
        keep = set(layers)
        chosen = [(n, m) for n, m in chosen if stack_of(stacks, n) is None or stack_of(stacks, n)[1] in keep]
    if not chosen:
        raise ValueError(f"targets={targets!r} with layers={layers} selects no {what}.")
    return chosen
