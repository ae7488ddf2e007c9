"""Partial-backprop selection policies: ``fastft.select_trainable`` chooses which weight tensors train.

    report = fastft.select_trainable(model, "layers", layers=range(-2, 0))       # top two decoder layers
    report = fastft.select_trainable(model, "half", seed=0)                      # Half Fine-Tuning
    report = fastft.select_trainable(model, "flops", budget=0.4, batch=batch)    # GreenTrainer
    print(report)            # every candidate tensor: trains or not, its FLOPs; the step's backward FLOPs
    ...train with any trainer...
    fastft.unselect(model)   # every requires_grad flag back as it was, hooks removed

The *candidates* are the parameters that require grad when ``select_trainable`` is called: on a plain model
(usually) all of them, so the policy picks tensors for full fine-tuning; on a fastft-patched model the
adapter parameters, so it picks e.g. which LoRA layers train. Candidates not chosen get
``requires_grad=False``; nothing else changes, except that the input of the lowest trainable decoder layer
(or of the lowest trainable module above the layers) enters it detached (:mod:`fastft.policies.cut`), so
nothing below is backpropagated even where transformers makes the embedding output require grad, and
reentrant gradient checkpointing keeps its gradients.

One file per policy: :mod:`.layers`, :mod:`.half`, :mod:`.flops`; the backward FLOPs of any choice come
from :mod:`.cost` (the model's autograd graph, read once on fake tensors) and GreenTrainer's programme
from :mod:`.knapsack`. The report's FLOPs are for the token shape of ``batch`` (default: one sequence of
``min(512, max_position_embeddings)`` tokens).

Bad input — an unknown policy or argument, a budget outside (0, 1], layers that do not exist, a model with
no trainable parameter, a model already under a selection — raises before anything changes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..report import count_parameters, logical_numel
from ..targets import find_layer_stack
from . import flops, half, layers
from .context import Choice, Context
from .cost import build_cost_model
from .cut import BackwardCut, checkpointing_of
from .report import SelectedTensor, SelectionReport

STATE_ATTR = "_fastft_selection"

POLICIES = {"layers": layers, "half": half, "flops": flops}
OPTIONS = {
    "layers": {"layers", "batch"},
    "half": {"batch"},
    "flops": {"batch", "closure", "update", "lr", "bins"},
}


@dataclass
class SelectionState:
    """Recorded on the model instance: what :func:`unselect` puts back."""

    requires_grad: dict[int, tuple[nn.Parameter, bool]]
    cut: BackwardCut | None
    report: SelectionReport


def selection_state(model: nn.Module) -> SelectionState | None:
    """The active selection of ``model``, or None."""
    return model.__dict__.get(STATE_ATTR)


def _check_budget(budget: Any) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r}: use a fraction in (0, 1] (e.g. 0.5 for half of full fine-tuning's backward FLOPs).")
    return float(budget)


def _inputs(model: nn.Module, batch: Any) -> dict[str, Any]:
    """Model keyword inputs from ``batch``: a dict, an ``input_ids`` tensor, or a (batch, sequence) shape."""
    if batch is None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512
        batch = (1, min(512, int(limit)))
    if isinstance(batch, Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(n, int) and n > 0 for n in batch):
        return {"input_ids": torch.zeros(batch, dtype=torch.long, device=_device(model))}
    raise ValueError(
        f"batch={type(batch).__name__}: pass model inputs (a dict such as a tokenizer's output, or an input_ids "
        "tensor) or a (batch_size, sequence_length) shape."
    )


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _token_shape(inputs: dict[str, Any]) -> tuple[int, ...]:
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, Tensor):
            return tuple(value.shape[:2])
    for value in inputs.values():
        if isinstance(value, Tensor):
            return tuple(value.shape)
    return ()


def _loss_runner(inputs: dict[str, Any], closure: Callable | None) -> Callable[[nn.Module], Tensor]:
    if closure is not None:
        return closure
    if "labels" not in inputs:
        if "input_ids" not in inputs:
            raise ValueError("the probe needs labels: pass batch with 'labels' (or 'input_ids'), or closure=.")
        inputs = {**inputs, "labels": inputs["input_ids"]}

    def run(model):
        loss = model(**inputs).loss
        if loss is None:
            raise ValueError("the model returned no loss for batch; pass labels or closure=.")
        return loss

    return run


def build_context(
    model: nn.Module,
    batch: Any = None,
    closure: Callable[[nn.Module], Any] | None = None,
    budget: float | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> Context:
    """The candidates (parameters that require grad now) and the backward-FLOP model of ``model``.

    ``ctx.backward_flops(indices)`` gives the exact backward FLOPs of training any subset of
    ``ctx.candidates``. Nothing in the model changes. ``select_trainable`` builds one; tests and the
    benchmark use it to check a choice against every alternative.
    """
    if closure is not None and not callable(closure):
        raise ValueError("closure= must be a callable taking the model and returning the loss.")
    candidates = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not candidates:
        raise ValueError(
            "no parameter of this model requires grad, so there is nothing to choose from; unfreeze the model "
            "(full fine-tuning) or patch it with fastft.patch first."
        )
    inputs = _inputs(model, batch)

    def run_forward(m):
        return closure(m) if closure is not None else m(**inputs)

    stack = find_layer_stack(model)
    layer_of = [None if stack is None else stack.index_of(name) for name, _ in candidates]
    blocks = [] if stack is None else list(stack.blocks)
    cost = build_cost_model(model, candidates, run_forward, blocks, stack.prefix if stack else "", _token_shape(inputs))
    return Context(model, candidates, stack, layer_of, cost, budget, seed, dict(options or {}))


def select_trainable(
    model: nn.Module,
    policy: str,
    budget: float | None = None,
    seed: int = 0,
    **options: Any,
) -> SelectionReport:
    """Choose which of ``model``'s trainable tensors train, by ``policy``; return a :class:`SelectionReport`.

    Args:
        model: a transformers model, plain or patched by ``fastft.patch``.
        policy: ``"layers"`` (:mod:`fastft.policies.layers`), ``"half"`` (:mod:`fastft.policies.half`) or
            ``"flops"`` (:mod:`fastft.policies.flops`).
        budget: a fraction in (0, 1]: for ``"flops"`` of full fine-tuning's backward FLOPs (required); for
            ``"layers"`` of the decoder layers (the top ones); ``"half"`` takes none.
        seed: the random choice of ``"half"``.
        options: ``layers=`` (policy ``"layers"``); ``batch=`` (inputs for the FLOP report and the
            ``"flops"`` probe); ``closure=``, ``update=``, ``lr=``, ``bins=`` (``"flops"``).

    Undo with :func:`unselect`. Call it before ``fastft.unpatch``; select again after a new patch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.select_trainable expects a torch.nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}.")
    unknown = sorted(set(options) - OPTIONS[policy])
    if unknown:
        raise TypeError(f"policy {policy!r} takes no argument(s) {unknown}; it takes {sorted(OPTIONS[policy])}.")
    if selection_state(model) is not None:
        raise ValueError("this model already has a selection; call fastft.unselect(model) first.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: use an integer.")
    budget = _check_budget(budget)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "no parameter of this model requires grad, so there is nothing to choose from; unfreeze the model "
            "(full fine-tuning) or patch it with fastft.patch first."
        )
    stack = find_layer_stack(model)
    n_layers = 0 if stack is None else len(stack.blocks)
    POLICIES[policy].check(budget, options, n_layers)
    closure = options.get("closure")
    if policy == "flops" and isinstance(options.get("batch"), tuple):
        raise ValueError("policy 'flops' probes with real data: pass a batch of inputs, not a shape.")
    loss_run = _loss_runner(_inputs(model, options.get("batch")), closure) if policy == "flops" else None
    ctx = build_context(model, options.get("batch"), closure, budget=budget, seed=seed, options=options)
    ctx.options["loss_run"] = loss_run
    choice: Choice = POLICIES[policy].choose(ctx)

    # ------------------------------------------------------------------ apply (nothing failed so far)
    selected = set(choice.selected)
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    for j, (_, param) in enumerate(ctx.candidates):
        param.requires_grad_(j in selected)
    where = ctx.cut_for(ctx.lowest(selected))
    cut = None
    if where is not None:
        module = stack.blocks[where[1]] if where[0] == "layer" else model.get_submodule(where[1])
        cut = BackwardCut(module)
    report = _report(ctx, policy, budget, seed, options, choice, where)
    model.__dict__[STATE_ATTR] = SelectionState(flags, cut, report)
    return report


def _report(ctx: Context, policy, budget, seed, options, choice: Choice, where) -> SelectionReport:
    selected = set(choice.selected)
    tensors = []
    for j, (name, param) in enumerate(ctx.candidates):
        tensors.append(SelectedTensor(
            name=name,
            shape=tuple(param.shape),
            params=logical_numel(param),
            trainable=j in selected,
            layer=ctx.layer_of[j],
            dw_flops=ctx.cost.private_flops(j),
            alone_flops=ctx.backward_flops([j]),
            importance=None if choice.importance is None else choice.importance[j],
        ))
    trainable, total = count_parameters(ctx.model)
    arguments: dict[str, Any] = {}
    if budget is not None:
        arguments["budget"] = budget
    if policy == "half":
        arguments["seed"] = seed
    for key in ("layers", "update", "lr"):
        if key in options:
            arguments[key] = options[key]
    modes = sorted({checkpointing_of(b) for b in ctx.stack.blocks}) if ctx.stack is not None else ["none"]
    notes = list(choice.notes)
    if where is not None and getattr(ctx.model, "_require_grads_hooks", None):
        notes.append(
            "the embedding output is made to require grad (transformers' enable_input_require_grads): the layers "
            "below the cut still record a graph in the forward, which the cut drops; "
            "model.disable_input_require_grads() avoids it"
        )
    if "reentrant" in modes and where is not None and where[0] == "layer":
        notes.append(
            f"reentrant checkpointing: the input of {ctx.cut_name(where)} enters as a leaf that requires grad, so "
            "its parameters get gradients; its input gradient is counted in the backward FLOPs"
        )
    return SelectionReport(
        model=type(ctx.model).__name__,
        policy=policy,
        arguments=arguments,
        tokens=ctx.cost.tokens,
        tensors=tensors,
        trainable_params=trainable,
        total_params=total,
        backward_flops=ctx.backward_flops(selected),
        full_backward_flops=ctx.backward_flops(ctx.all_candidates()),
        cut=ctx.cut_name(where),
        checkpointing=modes[0] if len(modes) == 1 else "mixed (" + ", ".join(modes) + ")",
        budget_flops=choice.budget_flops,
        notes=notes,
    )


def unselect(model: nn.Module) -> nn.Module:
    """Undo :func:`select_trainable`: every ``requires_grad`` flag as before, the backward cut removed."""
    state = selection_state(model)
    if state is None:
        raise ValueError("fastft.unselect: this model has no selection (nothing to undo).")
    for param, flag in state.requires_grad.values():
        param.requires_grad_(flag)
    if state.cut is not None:
        state.cut.remove()
    del model.__dict__[STATE_ATTR]
    return model


__all__ = ["POLICIES", "SelectionReport", "build_context", "select_trainable", "selection_state", "unselect"]
