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
  fastft LoRA                  see :func:`_lora_items` (the backward of ``fastft.ops.lora``)
  fastft DoRA, QAT, S²FT, loss  :func:`_dora_linear_items`, :func:`_dora_row_norm_items`,
                               :func:`_quant_linear_items`, :func:`_fake_quantize_items`,
                               :func:`_hadamard_items`, :func:`_s2ft_linear_items`, :func:`_givens_rotation_items`,
                               :func:`_linear_cross_entropy_items`: each op's backward as its reference
                               computes it. The fused loss computes its gradient products in its forward
                               ("mean"/"sum"); they are counted here all the same, as the cost of training

A node kind that may hold matrix products and has no formula here (a convolution, a custom autograd
function, a compiled region) is an error naming it, never a silent zero; formulas for new fastft ops are
added with :func:`register_node_cost`.

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

from ..math.hadamard import hadamard_factorization
from .cut import first_tensor, replace_first_tensor

NodeCost = Callable[[Any, Callable[[Any], tuple[int, ...]]], list[tuple[int, tuple[int, ...]]]]
"""A node's cost formula: ``(node, grad_shape) -> [(flops, trigger input indices), ...]``.

An item is computed when any of its trigger inputs (indices into ``node.next_functions``) needs grad.
``grad_shape(node)`` gives the shape of the gradient flowing into the node (its output's shape).
"""

NODE_COSTS: dict[str, NodeCost] = {}

# node kinds whose backward holds no matrix product (FlopCounterMode counts them 0) but whose names match
# the pattern below
_ZERO_COST = {"EmbeddingBackward0", "EmbeddingBagBackward0", "AccumulateGrad"}
_SUSPECT = re.compile(r"mm|conv|attention|matmul|linear|einsum|flash|cudnn|dot", re.IGNORECASE)


def register_node_cost(node_name: str, formula: NodeCost) -> None:
    """Give the backward FLOPs of an autograd node kind (``type(node).__name__``)."""
    NODE_COSTS[node_name] = formula


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


def _bmm_items(node, grad_shape):
    flops = _bmm_shape(node, "_saved_self", "_saved_mat2", grad_shape)
    return [(flops, (0,)), (flops, (1,))]


def _baddbmm_items(node, grad_shape):
    flops = _bmm_shape(node, "_saved_batch1", "_saved_batch2", grad_shape)
    return [(flops, (1,)), (flops, (2,))]


def _sdpa_items(node, grad_shape):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    q, k, v, out = node._saved_query, node._saved_key, node._saved_value, node._saved_output
    flops = sdpa_backward_flop_count(tuple(out.shape), tuple(q.shape), tuple(k.shape), tuple(v.shape))
    return [(int(flops), (0, 1, 2))]


def _lora_items(node, grad_shape):
    """``fastft::lora_linear`` (fastft/ops/lora.py): for N tokens, in K, out O, rank R::

        gb = g B      2·N·O·R   when x or A needs grad
        dx = g W + s·gb A       2·N·K·O + 2·N·R·K   when x needs grad
        dA = s·gbᵀ x̃  2·N·R·K   when A trains
        dB = s·gᵀ xa  2·N·O·R   when B trains

    The tensor inputs are x, weight, [absmax, code], [bias], lora_A, lora_B (no dropout mask: the graph
    is read in eval mode), so x is edge 0 and A, B are the last two.
    """
    saved = node.saved_tensors
    xa, lora_B = saved[1], saved[6]
    in_features = node.meta[1]
    tokens, rank = xa.shape
    out_features = lora_B.shape[0]
    last = len(node.next_functions) - 1
    a_edge, b_edge = last - 1, last
    return [
        (2 * tokens * out_features * rank, (0, a_edge)),
        (2 * tokens * in_features * out_features + 2 * tokens * rank * in_features, (0,)),
        (2 * tokens * rank * in_features, (a_edge,)),
        (2 * tokens * out_features * rank, (b_edge,)),
    ]


# ----------------------------------------------------------------------------------- fastft ops
# Each formula below lists the products of one op's backward as its PyTorch reference computes them (the
# Triton and C++ kernels compute the same products). Tensor inputs that are None have no edge in the graph,
# so the edge of each input is counted from the ones present.


def _tokens(tensor) -> int:
    """Rows of a (..., features) tensor."""
    return tensor.numel() // max(1, tensor.shape[-1])


def _tokens_and_features(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, features) of a (..., features) shape."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel // max(1, int(shape[-1])), int(shape[-1])


def _dora_linear_items(node, grad_shape):
    """``fastft::dora_linear`` (fastft/ops/dora.py): for N tokens, in K, out O, rank R, with gz = g ⊙ gy::

        gb = gz B        2·N·O·R           when x or A needs grad
        dx = gz W + s·gb A    2·N·O·K + 2·N·R·K   when x needs grad (with dropout one more 2·N·O·K: the
                                            dropped path's GEMM; counted when the layer has dropout, as
                                            a training step draws a mask — the graph is read in eval mode)
        dA = s·gbᵀ x̃     2·N·R·K           when A trains
        dB = s·gzᵀ xa    2·N·O·R           when B trains
        dg = Σ gy ⊙ z    0 (elementwise; rows with g = 0, a zero magnitude, are recomputed: not counted)

    Tensor inputs: x, weight, [absmax, code], [bias], lora_A, lora_B, g, [mask].
    """
    _, xa, _, _, absmax, _, bias, lora_A, lora_B, g, mask = node.saved_tensors
    in_features, p = node.meta[2], node.meta[4]
    tokens, rank = xa.shape
    out_features = lora_B.shape[0]
    a_edge = 2 + (2 if absmax is not None else 0) + (1 if bias is not None else 0)
    b_edge = a_edge + 1
    dx = 2 * tokens * out_features * in_features * (2 if (mask is not None or p > 0.0) else 1)
    return [
        (2 * tokens * out_features * rank, (0, a_edge)),
        (dx + 2 * tokens * rank * in_features, (0,)),
        (2 * tokens * rank * in_features, (a_edge,)),
        (2 * tokens * out_features * rank, (b_edge,)),
    ]


def _dora_row_norm_items(node, grad_shape):
    """``fastft::dora_row_norm`` (only in graphs with ``LoRAConfig(dora_detach_norm=False)``): out O, in K, rank R::

        dB = 2s·diag(dq)(P + s·B(A Aᵀ))                 2·R·K·R + 2·O·R·R   when B trains
        dA = 2s·(diag(dq)B)ᵀ W + 2s²·(Bᵀ diag(dq) B) A   2·R·O·K + 2·R·O·R + 2·R·R·K   when A trains

    Tensor inputs: weight, [absmax, code], lora_A, lora_B, weight_sq_norm.
    """
    norm, _, _, absmax, _, lora_A, _ = node.saved_tensors
    out_features = norm.shape[0]
    rank, in_features = lora_A.shape
    a_edge = 1 + (2 if absmax is not None else 0)
    return [
        (2 * rank * in_features * rank + 2 * out_features * rank * rank, (a_edge + 1,)),
        (2 * rank * out_features * in_features + 2 * rank * out_features * rank + 2 * rank * rank * in_features,
         (a_edge,)),
    ]


def _hadamard_flops(shape: tuple[int, ...]) -> int:
    """One Hadamard transform over the last dimension d = K·2^n: butterflies and the 1/sqrt(d) scale are
    additions and products by constants (0); the K×K product is 2·K·d per row (0 for K = 1)."""
    if not shape:
        return 0
    K, _ = hadamard_factorization(int(shape[-1]))
    numel = 1
    for size in shape:
        numel *= int(size)
    return 2 * K * numel if K > 1 else 0


def _hadamard_items(node, grad_shape):
    """``fastft::hadamard_transform``: the backward is the opposite transform of the gradient (input x, edge 0)."""
    return [(_hadamard_flops(grad_shape(node)), (0,))]


def _givens_rotation_items(node, grad_shape):
    """``fastft::givens_rotation`` (qGOFT's butterfly, fastft/ops/givens_rotation.py): its backward is
    elementwise multiply-adds per pair and stage (``givens_rotation_flops``), no matrix product, so 0 in
    FlopCounterMode's convention (as the Hadamard butterflies)."""
    return [(0, (0, 1))]


def _fake_quantize_items(node, grad_shape):
    """``fastft::fake_quantize``: the straight-through gradient is elementwise (0); with ``rotate`` the inverse
    Hadamard transform of the gradient follows (see :func:`_hadamard_flops`)."""
    return [(_hadamard_flops(grad_shape(node)) if node.rotate else 0, (0,))]


def _quant_linear_items(node, grad_shape):
    """``fastft.ops.quant_linear`` (the autograd function of QAT's linear layers): for N tokens, in K, out O,
    and under LoRA rank R::

        W_eff = W + s·BA       2·O·R·K     recomputed whenever the backward runs (LoRA only)
        dx = g Q_w(W_eff)      2·N·O·K     when x needs grad
      identity STE:
        dW = gᵀ x              2·N·O·K     when W trains (QAT alone)
        dA = s·(g B)ᵀ x        2·N·O·R + 2·N·R·K   when A trains
        dB = s·gᵀ(x Aᵀ)        2·N·K·R + 2·N·O·R   when B trains
      clipped STE:
        dW_eff = M ⊙ (gᵀ x)    2·N·O·K     when W, A or B trains
        dA = s·Bᵀ dW_eff       2·R·O·K     when A trains
        dB = s·dW_eff Aᵀ       2·O·K·R     when B trains

    Q_w and the clipped mask are elementwise (0). Tensor inputs: x, weight, [bias], [lora_A, lora_B].
    """
    x, weight, lora_A, lora_B = node.saved_tensors
    out_features, in_features = weight.shape
    tokens = _tokens(x)
    w_edge = 1
    a_edge = 2 + (1 if node.bias_dtype is not None else 0)
    b_edge = a_edge + 1
    every = tuple(range(len(node.next_functions)))
    nok = 2 * tokens * out_features * in_features
    items = [(nok, (0,))]
    if lora_A is None:
        items.append((nok, (w_edge,)))
        return items
    rank = lora_A.shape[0]
    items.append((2 * out_features * rank * in_features, every))
    if node.clipped:
        items += [
            (nok, (w_edge, a_edge, b_edge)),
            (2 * rank * out_features * in_features, (a_edge,)),
            (2 * out_features * in_features * rank, (b_edge,)),
        ]
    else:
        items += [
            (nok, (w_edge,)),
            (2 * tokens * out_features * rank + 2 * tokens * rank * in_features, (a_edge,)),
            (2 * tokens * in_features * rank + 2 * tokens * out_features * rank, (b_edge,)),
        ]
    return items


def _linear_cross_entropy_items(node, grad_shape):
    """``fastft::linear_cross_entropy``: for N tokens, hidden H, vocabulary V, low-rank R (a LoRA lm_head)::

        dh  = g W      2·N·V·H   when the hidden states need grad
        dW  = gᵀ h     2·N·V·H   when the lm_head weight trains
        dh₂ = g W₂     2·N·V·R   when h₂ = s·dropout(h)Aᵀ needs grad
        dW₂ = gᵀ h₂    2·N·V·R   when W₂ = B trains
        db  = Σ g      0

    For ``reduction="mean"``/``"sum"`` the op computes these products during its forward (it keeps the
    gradients, the backward only scales them), for ``"none"`` in the backward, which first recomputes the
    logits (2·N·V·(H + R), whenever it runs). Either way they are the cost of training what they serve, so
    they are counted here: for a fused-loss model the report's backward FLOPs are the step's FLOPs minus
    those of a forward without gradients. Tensor inputs: hidden, weight, labels, [bias], [h₂, W₂], ...
    """
    tokens, hidden, vocab, rank, has_bias = node.sizes
    h2_edge = 3 + (1 if has_bias else 0)
    w2_edge = h2_edge + 1
    items = [(2 * tokens * vocab * hidden, (0,)), (2 * tokens * vocab * hidden, (1,))]
    if rank:
        items += [(2 * tokens * vocab * rank, (h2_edge,)), (2 * tokens * vocab * rank, (w2_edge,))]
    if node.reduction == "none":
        items.append((2 * tokens * vocab * (hidden + rank), tuple(range(len(node.next_functions)))))
    return items


def _s2ft_linear_items(node, grad_shape):
    """``fastft::s2ft_linear`` (fastft/ops/s2ft_linear.py): for N tokens, in K, out O, slice width S::

        dx   = g W                           2·N·O·K   when x needs grad
        dW_s = gᵀ x[:, :S]   (columns)       2·N·O·S   when the slice trains
             = g[:, :S]ᵀ x   (rows)          2·N·S·K

    Tensor inputs: x, weight, [bias], weight_slice (the last edge).
    """
    width, rows, _, _, in_features = node.meta
    tokens, out_features = _tokens_and_features(grad_shape(node))
    slice_edge = len(node.next_functions) - 1
    dw = 2 * tokens * width * in_features if rows else 2 * tokens * out_features * width
    return [(2 * tokens * out_features * in_features, (0,)), (dw, (slice_edge,))]


for _name, _formula in {
    "MmBackward0": _mm_items,
    "AddmmBackward0": _addmm_items,
    "BmmBackward0": _bmm_items,
    "BaddbmmBackward0": _baddbmm_items,
    "ScaledDotProductFlashAttentionForCpuBackward0": _sdpa_items,
    "ScaledDotProductFlashAttentionBackward0": _sdpa_items,
    "ScaledDotProductEfficientAttentionBackward0": _sdpa_items,
    "ScaledDotProductCudnnAttentionBackward0": _sdpa_items,
    "GeneratedBackwardFor_fastft_lora_linear_defaultBackward": _lora_items,
    "_LoRALinearEagerBackward": _lora_items,  # the same op without the custom-op machinery (eager, plain tensors)
    "GeneratedBackwardFor_fastft_dora_linear_defaultBackward": _dora_linear_items,
    "GeneratedBackwardFor_fastft_dora_row_norm_defaultBackward": _dora_row_norm_items,
    "GeneratedBackwardFor_fastft_hadamard_transform_defaultBackward": _hadamard_items,
    "GeneratedBackwardFor_fastft_fake_quantize_defaultBackward": _fake_quantize_items,
    "GeneratedBackwardFor_fastft_givens_rotation_defaultBackward": _givens_rotation_items,
    "_QuantWeightLinearBackward": _quant_linear_items,
    "GeneratedBackwardFor_fastft_linear_cross_entropy_defaultBackward": _linear_cross_entropy_items,
    "GeneratedBackwardFor_fastft_s2ft_linear_defaultBackward": _s2ft_linear_items,
}.items():
    register_node_cost(_name, _formula)

_NEEDS_GRAD_SHAPE = {
    "BmmBackward0",
    "BaddbmmBackward0",
    "GeneratedBackwardFor_fastft_hadamard_transform_defaultBackward",
    "GeneratedBackwardFor_fastft_fake_quantize_defaultBackward",
    "GeneratedBackwardFor_fastft_s2ft_linear_defaultBackward",
}


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
            grad_shapes = _grad_shapes(root, nodes) if any(type(n).__name__ in _NEEDS_GRAD_SHAPE for n in nodes) else {}
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
        if type(node).__name__ in _NEEDS_GRAD_SHAPE:
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
