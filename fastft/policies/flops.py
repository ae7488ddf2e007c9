"""Policy ``"flops"``: GreenTrainer — the most important tensors whose backward fits a FLOP budget.

1. Importance, from one probe step on the user's batch (or loss closure): every candidate gets its
   gradient g, the update Δw a first optimizer step would make (``update="adam"``: Δw = -lr·g/(|g|+eps),
   Adam's bias-corrected first step; ``update="sgd"``: Δw = -lr·g), and the first-order loss reduction
   ``I = -Σ g ⊙ Δw``. The weights are never written; the gradients the parameters held before, the
   buffers, the RNG state and every ``requires_grad`` flag are as before when the probe ends.
2. Selection: the set S maximising Σ_{k∈S} I_k subject to backward_flops(S) ≤ budget × backward_flops(all
   candidates), where backward_flops(S) counts the weight-gradient products of the chosen tensors plus the
   activation-gradient products from the loss down to the deepest one (:mod:`fastft.policies.cost`),
   solved by the dynamic programme of :mod:`fastft.policies.knapsack`.

Arguments: ``budget`` in (0, 1] (required); ``batch`` (model inputs with ``labels``, or ``input_ids`` used
as their own labels) or ``closure`` (a callable ``closure(model) -> loss``); ``update`` and ``lr``; ``bins``
(knapsack resolution).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .context import Choice, Context
from .cut import BackwardCut
from .knapsack import solve

UPDATES = ("adam", "sgd")


def check(budget, options: dict, n_layers: int) -> None:
    if budget is None:
        raise ValueError("policy 'flops' needs budget=: the fraction of full fine-tuning's backward FLOPs, in (0, 1].")
    if options.get("batch") is None and options.get("closure") is None:
        raise ValueError(
            "policy 'flops' needs a probe step: pass batch= (model inputs with labels, or input_ids) or "
            "closure= (a callable taking the model and returning the loss)."
        )
    if options.get("update", "adam") not in UPDATES:
        raise ValueError(f"update={options.get('update')!r}: choose one of {list(UPDATES)}.")
    lr = options.get("lr", 1e-4)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr={lr!r}: the probe step size must be a positive number.")


@contextlib.contextmanager
def preserved_state(model: nn.Module, params: list[nn.Parameter]):
    """Everything a probe step may touch besides the weights comes back as it was: ``.grad``, buffers,
    ``requires_grad`` flags and the RNG states."""
    grads = [p.grad for p in params]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def probe_importance(ctx: Context, run: Callable[[nn.Module], Any]) -> list[float]:
    """``I_k = -Σ g ⊙ Δw`` for every candidate, from one forward/backward of ``run(model)`` (see above)."""
    update = ctx.options.get("update", "adam")
    lr = float(ctx.options.get("lr", 1e-4))
    eps = 1e-8
    params = [p for _, p in ctx.candidates]
    with preserved_state(ctx.model, params):
        cut = None
        lowest_cut = ctx.cut_for(ctx.lowest(ctx.all_candidates()))
        if lowest_cut is not None and lowest_cut[0] == "layer":
            cut = BackwardCut(ctx.stack.blocks[lowest_cut[1]])  # reentrant checkpointing would lose layer grads
        try:
            loss = run(ctx.model)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"the probe needs a scalar loss, got {type(loss).__name__}")
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(
                    f"select_trainable(policy='flops'): the probe loss is {loss.item()!r}, so its gradients rank "
                    "nothing (e.g. every label of batch is -100); pass a batch with real targets or closure=."
                )
            loss.backward()
        finally:
            if cut is not None:
                cut.remove()
        importance = []
        for p in params:
            g = p.grad
            if g is None:
                importance.append(0.0)
                continue
            g = g.detach().double()
            delta = -lr * g if update == "sgd" else -lr * g / (g.abs() + eps)
            importance.append(float(-(g * delta).sum()))
    return importance


def choose(ctx: Context) -> Choice:
    run = ctx.options["loss_run"]
    importance = probe_importance(ctx, run)
    everything = ctx.all_candidates()
    full = ctx.backward_flops(everything)
    capacity = int(ctx.budget * full)
    problem, index_of, exact = ctx.selection_problem(importance, capacity)
    solution = solve(problem, max_bins=int(ctx.options.get("bins", 1 << 16)))
    selected = sorted(index_of[k] for k in solution.chosen)
    if not selected:
        cheapest = min(ctx.backward_flops([j]) for j in index_of)
        raise ValueError(
            f"budget={ctx.budget} allows {capacity:,} backward FLOPs, less than training the cheapest single "
            f"tensor costs ({cheapest:,} FLOPs, {cheapest / full:.4f} of training every candidate); raise the budget."
        )
    notes = []
    if not exact:
        notes.append("the FLOP model of this architecture is not nested; the programme used an upper bound")
    if not solution.exact:
        notes.append("knapsack weights were rounded up to the programme's resolution (bins=); the budget holds")
    unreached = [ctx.candidates[j][0] for j in everything if ctx.cost.leaves[j].position < 0]
    if unreached:
        notes.append(f"{len(unreached)} candidates do not affect the loss and stay frozen: {unreached[:3]}")
    return Choice(selected, importance=importance, budget_flops=capacity, notes=notes)
