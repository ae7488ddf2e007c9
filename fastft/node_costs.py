"""The registry of backward-FLOP formulas, one per autograd node kind (base layer: imports nothing of fastft).

Each op in ``fastft.ops`` writes the FLOP formula of its backward beside its reference and registers it
with ``fastft.dispatch.register_op(..., node_costs={"<autograd node name>": formula})``, which lands here;
:mod:`fastft.policies.cost` reads the formulas while it walks a model's autograd graph, so the policies
never import an op and an op never imports the policies. The generic aten nodes (mm, addmm, bmm,
baddbmm, SDPA) keep their formulas in :mod:`fastft.policies.cost`.

A formula is ``formula(node, grad_shape) -> [(flops, trigger edges), ...]``: one item per product the
backward computes, counted when any of its trigger inputs (indices into ``node.next_functions``) needs
grad. FLOPs follow ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; elementwise work 0).
A formula that reads ``grad_shape(node)`` (the shape of the gradient flowing into the node: its output's
shape) is decorated with :func:`reads_grad_shape`, so the walker runs the one extra fake backward that
measures those shapes only when such a node is in the graph.

The node name of a ``torch.library.custom_op`` ``fastft::<op>`` with a registered autograd is
``GeneratedBackwardFor_fastft_<op>_defaultBackward`` (:func:`custom_op_node`); of a
``torch.autograd.Function`` subclass ``F`` it is ``FBackward``. ``type(y.grad_fn).__name__`` shows it.
"""
from __future__ import annotations

from typing import Any, Callable

NodeCost = Callable[[Any, Callable[[Any], tuple[int, ...]]], list[tuple[int, tuple[int, ...]]]]
"""A node's cost formula: ``(node, grad_shape) -> [(flops, trigger input indices), ...]``."""

NODE_COSTS: dict[str, NodeCost] = {}
"""Autograd node name -> its formula."""

GRAD_SHAPE_NODES: set[str] = set()
"""Node names whose formula reads ``grad_shape``."""


def reads_grad_shape(formula: NodeCost) -> NodeCost:
    """Mark a formula that calls ``grad_shape(node)``."""
    formula.reads_grad_shape = True
    return formula


def register_node_cost(node_name: str, formula: NodeCost) -> None:
    """Give the backward FLOPs of an autograd node kind (``type(node).__name__``)."""
    NODE_COSTS[node_name] = formula
    if getattr(formula, "reads_grad_shape", False):
        GRAD_SHAPE_NODES.add(node_name)
    else:
        GRAD_SHAPE_NODES.discard(node_name)


def custom_op_node(op: str, namespace: str = "fastft") -> str:
    """The autograd node name of ``torch.library.custom_op("<namespace>::<op>")`` with a registered autograd."""
    return f"GeneratedBackwardFor_{namespace}_{op}_defaultBackward"


def rows(tensor) -> int:
    """Rows of a (..., features) tensor."""
    return tensor.numel() // max(1, tensor.shape[-1])


def rows_and_features(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, features) of a (..., features) shape."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel // max(1, int(shape[-1])), int(shape[-1])
