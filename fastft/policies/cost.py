"""The backward FLOPs of training any subset of a model's parameters, read off its autograd graph.

One forward pass runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes only, no memory, no
arithmetic) with every candidate parameter requiring grad, in eval mode (no dropout; transformers does
not checkpoint in eval mode, so the graph is visible). The graph it records is then read as a list of
*cost items*: each matrix product the backward would compute, with its FLOPs from the shapes, and the set
R of leaves (parameters) whose gradient needs it. Training a set S of parameters costs

    backward_flops(S) = Σ_items  flops(item) · [R(item) ∩ S ≠ ∅]

because autograd computes an input's gradient exactly when that input depends on a parameter that
requires grad. FLOPs follow ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; matrix
products and attention only; elementwise work, norms, softmax and embedding gradients count 0):

  ``x Wᵀ`` (mm / addmm)        dX = g W: 2·N·in·out if x needs grad;  dW = gᵀ x: 2·N·in·out if W trains
  bmm (eager attention)        2·b·m·k·n for each operand that needs grad
  fused attention (SDPA)       torch's ``sdpa_backward_flop_count`` (five b·h·s²·d products, causal
                               masking not discounted) when q, k or v needs grad
  fastft's ops                 each op's formula sits beside it in ``fastft/ops/<op>.py``
                               (``<op>_backward_flops``: its backward as its reference computes it) and
                               is registered with ``register_op(..., node_costs=...)`` in the registry
                               :mod:`fastft.node_costs`, which this module reads. The fused loss computes
                               its gradient products in its forward ("mean"/"sum"); they are counted all
                               the same, as the cost of training

A node kind that may hold matrix products and has no formula (a convolution, a custom autograd
function, a compiled region) is an error naming it, never a silent zero; formulas for other node kinds
are added with :func:`register_node_cost` (:mod:`fastft.node_costs`).

Positions: every leaf is placed at its first use in the forward (the autograd sequence number of the
first node that reads it), so position 0 is the deepest (the embedding) and the last is the top (lm_head).
Each decoder layer also gets a *pseudo leaf* ``z_i`` added to its input (``h + z_i``, z_i a zero
scalar): it stands for "the input of layer i requires grad", which is what reentrant gradient
checkpointing needs (see :mod:`fastft.policies.cut`). Leaves that require grad without being parameters
(e.g. transformers' ``enable_input_require_grads`` makes the embedding output one) are *external*.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  (importing the ops registers their FLOP formulas)
from ..node_costs import GRAD_SHAPE_NODES, NODE_COSTS, NodeCost, reads_grad_shape, register_node_cost  # noqa: F401
from .cut import first_tensor, replace_first_tensor

# node kinds whose backward holds no matrix product (FlopCounterMode counts them 0) but whose names match
# the pattern below
_ZERO_COST = {"EmbeddingBackward0", "EmbeddingBagBackward0", "AccumulateGrad"}
_SUSPECT = re.compile(r"mm|conv|attention|matmul|linear|einsum|flash|cudnn|dot", re.IGNORECASE)


def _sizes(value) -> tuple[int, ...]:
    return tuple(int(s) for s in value)


def _mm_items(node, grad_shape):
    m, k = _sizes(node._saved_self_sym_sizes)
    n = _sizes(node._saved_mat2_sym_sizes)[1]
    flops = 2 * m * k * n
    return [(flops, (0,)), (flops, (1,))]


def _addmm_items(node, grad_shape):
    m, k = _sizes(node._saved_mat1_sym_sizes)
    n = _sizes(node._saved_mat2_sym_sizes)[1]
    flops = 2 * m * k * n
    return [(flops, (1,)), (flops, (2,))]  # input 0 is the bias: its gradient is a sum (0 FLOPs)


def _bmm_shape(node, first: str, second: str, grad_shape):
    a, b = getattr(node, first), getattr(node, second)
    batch, m, n = grad_shape(node)
    k = a.shape[2] if a is not None else b.shape[1]
    return 2 * batch * m * k * n


@reads_grad_shape
def _bmm_items(node, grad_shape):
    flops = _bmm_shape(node, "_saved_self", "_saved_mat2", grad_shape)
    return [(flops, (0,)), (flops, (1,))]


@reads_grad_shape
def _baddbmm_items(node, grad_shape):
    flops = _bmm_shape(node, "_saved_batch1", "_saved_batch2", grad_shape)
    return [(flops, (1,)), (flops, (2,))]


def _sdpa_items(node, grad_shape):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    q, k, v, out = node._saved_query, node._saved_key, node._saved_value, node._saved_output
    flops = sdpa_backward_flop_count(tuple(out.shape), tuple(q.shape), tuple(k.shape), tuple(v.shape))
    return [(int(flops), (0, 1, 2))]


for _name, _formula in {
    "MmBackward0": _mm_items,
    "AddmmBackward0": _addmm_items,
    "BmmBackward0": _bmm_items,
    "BaddbmmBackward0": _baddbmm_items,
    "ScaledDotProductFlashAttentionForCpuBackward0": _sdpa_items,
    "ScaledDotProductFlashAttentionBackward0": _sdpa_items,
    "ScaledDotProductEfficientAttentionBackward0": _sdpa_items,
    "ScaledDotProductCudnnAttentionBackward0": _sdpa_items,
}.items():
    register_node_cost(_name, _formula)


@dataclass
class CostItem:
    """A product the backward computes when a leaf in ``reach`` (a bit mask over leaves) needs grad."""

    flops: int
    reach: int
    node: str


@dataclass
class Leaf:
    """A leaf of the graph: a candidate parameter, a layer's pseudo input leaf, or an external leaf."""

    kind: str  # "param" | "pseudo" | "external"
    name: str
    position: int = -1
    layer: int | None = None


@dataclass
class CostModel:
    """Cost items over the leaves of one model's graph; see the module docstring.

    ``leaves[:n_params]`` are the candidate parameters in the order given; ``position`` ranks all leaves
    by first use (0 = deepest). Candidates the loss does not depend on keep ``position == -1`` and cost 0.
    """

    leaves: list[Leaf]
    n_params: int
    items: list[CostItem]
    tokens: tuple[int, ...]
    pseudo_of_layer: dict[int, int] = field(default_factory=dict)

    def flops(self, mask: int) -> int:
        """Backward FLOPs when exactly the leaves in ``mask`` (a bit mask) require grad."""
        return sum(item.flops for item in self.items if item.reach & mask)

    def private_flops(self, index: int) -> int:
        """FLOPs of the products only leaf ``index`` needs (its weight gradient)."""
        bit = 1 << index
        return sum(item.flops for item in self.items if item.reach == bit)

    def external_mask(self) -> int:
        mask = 0
        for i, leaf in enumerate(self.leaves):
            if leaf.kind == "external":
                mask |= 1 << i
        return mask


class _ProbeRunner(nn.Module):
    """Runs ``fn(model)`` so that ``torch.func.functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module], Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self):
        return self.fn(self.model)


def _root_of(output: Any) -> Tensor:
    """The tensor to start the graph from: a loss, or the logits (the loss adds no products)."""
    if isinstance(output, Tensor):
        return output
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find a loss or logits in the model output ({type(output).__name__}).")


def _walk(root: Tensor) -> list[Any]:
    """Every autograd node reachable from ``root``, children before parents (post-order)."""
    start = root.grad_fn
    if start is None:
        raise ValueError(
            "the model output does not depend on any trainable parameter; nothing would be backpropagated."
        )
    order, seen, stack = [], {start}, [(start, iter(start.next_functions))]
    while stack:
        node, children = stack[-1]
        advanced = False
        for child, _ in children:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append((child, iter(child.next_functions)))
                advanced = True
                break
        if not advanced:
            stack.pop()
            order.append(node)
    return order


def build_cost_model(
    model: nn.Module,
    candidates: list[tuple[str, nn.Parameter]],
    run: Callable[[nn.Module], Any],
    blocks: list[nn.Module],
    block_prefix: str,
    tokens: tuple[int, ...],
) -> CostModel:
    """Read the cost items of ``model`` for the given candidate parameters (see the module docstring).

    ``run(model)`` performs the forward (and may compute a loss); it is called once, on fake tensors, with
    the model in eval mode; the model's parameters, flags and modes are as before when this returns.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    modes = [(m, m.training) for m in model.modules()]
    leaves = [Leaf("param", name) for name, _ in candidates]
    n_params = len(leaves)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    handles = []
    pseudo_tensors: dict[int, int] = {}  # id(fake scalar) -> leaf index
    pseudo_of_layer: dict[int, int] = {}
    try:
        model.eval()
        with fake_mode:
            fakes, leaf_of_tensor = {}, {}
            for index, (name, param) in enumerate(candidates):
                fake = fake_mode.from_tensor(param.detach()).requires_grad_(True)
                fakes[name] = fake
                leaf_of_tensor[id(fake)] = index

            def add_pseudo(layer_index):
                def hook(module, args, kwargs):
                    hidden = first_tensor(args, kwargs)
                    if hidden is None:
                        return None
                    z = torch.zeros((), dtype=hidden.dtype, device=hidden.device, requires_grad=True)
                    leaf = len(leaves)
                    leaves.append(Leaf("pseudo", f"{block_prefix}.{layer_index} (input)", layer=layer_index))
                    pseudo_tensors[id(z)] = leaf
                    pseudo_of_layer[layer_index] = leaf
                    keep.append(z)
                    return replace_first_tensor(args, kwargs, hidden + z)

                return hook

            keep: list[Tensor] = []
            for i, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(add_pseudo(i), with_kwargs=True))
            runner = _ProbeRunner(model, run)
            output = functional_call(runner, {f"model.{k}": v for k, v in fakes.items()}, ())
            root = _root_of(output)
            leaf_of_tensor.update(pseudo_tensors)
            nodes = _walk(root)
            grad_shapes = _grad_shapes(root, nodes) if any(type(n).__name__ in GRAD_SHAPE_NODES for n in nodes) else {}
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode

    def grad_shape(node):
        return grad_shapes[node]

    reach: dict[Any, int] = {}
    first_use: dict[int, tuple[int, int]] = {}
    items: list[CostItem] = []
    for node in nodes:  # children first
        name = type(node).__name__
        mask = 0
        if name == "AccumulateGrad":
            index = leaf_of_tensor.get(id(node.variable))
            if index is None:
                index = len(leaves)
                leaves.append(Leaf("external", f"input of shape {tuple(node.variable.shape)}"))
                leaf_of_tensor[id(node.variable)] = index
            mask = 1 << index
        edge_reach = []
        for edge, (child, _) in enumerate(node.next_functions):
            r = 0 if child is None else reach[child]
            edge_reach.append(r)
            mask |= r
            if child is not None and type(child).__name__ == "AccumulateGrad":
                index = leaf_of_tensor[id(child.variable)]
                key = (node._sequence_nr(), edge)
                if index not in first_use or key < first_use[index]:
                    first_use[index] = key
        reach[node] = mask
        if name in NODE_COSTS:
            for flops, trigger in NODE_COSTS[name](node, grad_shape):
                r = 0
                for edge in trigger:
                    r |= edge_reach[edge] if edge < len(edge_reach) else 0
                if r and flops:
                    items.append(CostItem(int(flops), r, name))
        elif name not in _ZERO_COST and (_SUSPECT.search(name) or _is_python_function(node)):
            raise NotImplementedError(
                f"fastft.select_trainable cannot count the backward FLOPs of autograd node {name}: it may hold "
                "matrix products. Register its formula with fastft.policies.cost.register_node_cost("
                f"{name!r}, formula)."
            )
    for rank, index in enumerate(sorted(first_use, key=first_use.get)):
        leaves[index].position = rank
    return CostModel(leaves, n_params, items, tuple(tokens), pseudo_of_layer)


def _is_python_function(node) -> bool:
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def _grad_shapes(root: Tensor, nodes) -> dict[Any, tuple[int, ...]]:
    """The shape of the gradient entering each bmm-like node, from one backward on the fake graph."""
    shapes = {}
    handles = []
    for node in nodes:
        if type(node).__name__ in GRAD_SHAPE_NODES:
            def prehook(grad_outputs, node=node):
                shapes[node] = tuple(int(s) for s in grad_outputs[0].shape)

            handles.append(node.register_prehook(prehook))
    leaves = [n.variable for n in nodes if type(n).__name__ == "AccumulateGrad"]
    try:
        torch.autograd.grad(root.sum(), leaves, allow_unused=True, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    return shapes
