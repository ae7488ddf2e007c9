"""The LoFiT linear op: attention heads' offset vectors added to the input of the output projection, computed
as a bias of that projection.

For x (N×K, K = heads·head_dim, the concatenated per-head attention outputs), the frozen output projection W
(O×K) with optional bias b (O), the selected input columns c (the slices of the chosen query heads, |c| = H·d)
and the trainable offsets v (H×d, one vector per selected head)::

    x'  = x with x[:, c] += v.flatten()            (LoFiT: z_head ← z_head + v_head at every token)
    y   = x' Wᵀ + b  =  x Wᵀ + (b + W[:, c] v̄)      (v̄ = v.flatten(): the offset is a bias, exactly)

Backward, for g = ∂L/∂y (N×O)::

    dx = g W                         (x' and x have the same gradient)
    dv = (W[:, c]ᵀ Σ_tokens g).view(H, d)

What is saved for backward: nothing but W (a parameter) and c; no activation, x' is never formed. W and b
receive no gradient. Registered as ``fastft::lofit_linear`` (+ ``fastft::lofit_linear_backward``), with fake
kernels; the PyTorch implementation is the only backend: its work is one GEMM (cuBLAS on a GPU) plus an
O×|c| matrix-vector product per call, independent of N, so there is no memory traffic for a kernel to save.
FLOPs (backward): dx 2·N·K·O when x needs grad; dv 2·O·|c| + N·O (the token sum) when v trains.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dispatch import implementation, register_op
from ..node_costs import custom_op_node, reads_grad_shape, rows_and_features


def lofit_forward_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], columns: Tensor,
                            offset: Tensor) -> Tensor:
    """``x Wᵀ + b + W[:, c] v̄`` in PyTorch."""
    shift = weight[:, columns] @ offset.reshape(-1)
    return torch.nn.functional.linear(x, weight, shift if bias is None else bias + shift)


def lofit_backward_reference(grad_y: Tensor, weight: Tensor, columns: Tensor, offset_shape: list[int],
                             need_dx: bool, need_dv: bool) -> tuple[Tensor, Tensor]:
    """``(dx, dv)`` in PyTorch, empty where not needed."""
    dx = grad_y @ weight if need_dx else grad_y.new_empty(0)
    # a 1×O by O×|c| product (an mm, as the FLOP formula counts it)
    dv = (grad_y.sum(0, keepdim=True) @ weight[:, columns]).reshape(offset_shape) if need_dv else grad_y.new_empty(0)
    return dx, dv


@reads_grad_shape
def lofit_linear_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): for N tokens, in K, out O, |c| offset values::

        dx = g W                   2·N·K·O   when x needs grad
        dv = W[:, c]ᵀ Σ_tokens g   2·O·|c|   when the offsets train (the token sum is elementwise: 0)

    Tensor inputs: x, weight, [bias], columns, offset (the offset is the last edge).
    """
    weight, columns = node.saved_tensors
    tokens = rows_and_features(grad_shape(node))[0]
    out_features, in_features = weight.shape
    last = len(node.next_functions) - 1
    return [(2 * tokens * in_features * out_features, (0,)), (2 * out_features * columns.numel(), (last,))]


register_op("lofit_linear", {"torch": {"forward": lofit_forward_reference, "backward": lofit_backward_reference}},
            node_costs={custom_op_node("lofit_linear"): lofit_linear_backward_flops})


@torch.library.custom_op("fastft::lofit_linear", mutates_args=())
def _lofit_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], columns: Tensor, offset: Tensor) -> Tensor:
    return implementation("lofit_linear", "forward", x.device)(x, weight, bias, columns, offset)


@_lofit_op.register_fake
def _(x, weight, bias, columns, offset):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastft::lofit_linear_backward", mutates_args=())
def _lofit_backward_op(grad_y: Tensor, weight: Tensor, columns: Tensor, offset_shape: list[int], need_dx: bool,
                       need_dv: bool) -> tuple[Tensor, Tensor]:
    return implementation("lofit_linear", "backward", grad_y.device)(grad_y, weight, columns, offset_shape,
                                                                     need_dx, need_dv)


@_lofit_backward_op.register_fake
def _(grad_y, weight, columns, offset_shape, need_dx, need_dv):
    return (grad_y.new_empty(grad_y.shape[0], weight.shape[1]) if need_dx else grad_y.new_empty(0),
            grad_y.new_empty(offset_shape) if need_dv else grad_y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, columns, offset = inputs
    ctx.save_for_backward(weight, columns)
    ctx.meta = (list(offset.shape), ctx.needs_input_grad[0], ctx.needs_input_grad[4])


def _backward(ctx, grad_y):
    weight, columns = ctx.saved_tensors
    shape, need_dx, need_dv = ctx.meta
    dx, dv = _lofit_backward_op(grad_y.contiguous(), weight, columns, shape, need_dx, need_dv)
    return dx if need_dx else None, None, None, None, dv if need_dv else None


_lofit_op.register_autograd(_backward, setup_context=_setup_context)


def lofit_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], columns: Tensor, offset: Tensor) -> Tensor:
    """``x' Wᵀ + b`` with ``x'[..., c] = x[..., c] + v.flatten()`` over the last dimension of ``x`` (see the
    module docstring). ``columns`` is a 1-D int64 tensor of ``offset.numel()`` input indices."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"lofit_linear: input's last dimension is {x.shape[-1]}, the weight is "
                         f"{tuple(weight.shape)} (out×in)")
    if columns.dim() != 1 or columns.numel() != offset.numel():
        raise ValueError(f"lofit_linear: {columns.numel()} columns for an offset of {offset.numel()} values")
    x2 = x.reshape(-1, x.shape[-1])
    y = _lofit_op(x2, weight, bias, columns, offset)
    return y.reshape(*x.shape[:-1], weight.shape[0])
