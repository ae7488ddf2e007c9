"""The S²FT linear op: one dense GEMM forward; backward with the full input gradient and the weight
gradient of a contiguous slice only.

For x (N×K), a frozen weight W (O×K) whose slice ``W_s`` trains, and an optional frozen bias b (O)::

    y = x Wᵀ + b                                   (one GEMM over the whole W, slice included)

Backward, for the upstream gradient g = ∂L/∂y (N×O)::

    dx  = g W                                       (full: the layers below need it)
    columns mode, W_s = W[:, :S] (O×S):   dW_s = gᵀ x[:, :S]
    rows mode,    W_s = W[:S, :] (S×K):   dW_s = g[:, :S]ᵀ x

Nothing else: W and b receive no gradient, and no full-size weight gradient ever exists.

What is saved for backward: in columns mode only ``x[:, :S]`` (an N×S copy made while the forward
runs; x itself is not kept), in rows mode ``x`` (dW_s needs all of it; only the first S columns of g
are read), and W (a parameter, kept by the model anyway) when dx is needed. Nothing is saved for
dW_s when the slice does not require a gradient (evaluation, or a frozen slice).

The slice enters the op as its own tensor ``weight_slice`` only so that autograd routes dW_s to it:
its values must equal W's slice (``fastft.nn.S2FTLinear`` keeps it a view of W's storage), and the
forward reads W alone. S is ``weight_slice.shape[1]`` in columns mode, ``weight_slice.shape[0]`` in rows
mode.

Registered as the ``torch.library`` ops ``fastft::s2ft_linear`` and ``fastft::s2ft_linear_backward``
(with fake kernels, so ``torch.compile`` traces through them). The PyTorch implementation here is the
reference and runs on every device; on CUDA the Triton kernels in ``fastft.kernels.s2ft`` compute the
forward GEMM while copying ``x[:, :S]`` out of the tiles it loads, and dW_s with a split reduction over
the tokens. dx is a plain dense GEMM and goes to the vendor BLAS (``torch.mm``) on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node, reads_grad_shape, rows_and_features

def slice_width(weight_slice: Tensor, rows: bool) -> int:
    """S: the number of trained rows (rows mode) or columns (columns mode)."""
    return weight_slice.shape[0] if rows else weight_slice.shape[1]


def s2ft_forward_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], width: int, rows: bool, save_slice: bool
) -> tuple[Tensor, Tensor]:
    """``(y, x[:, :S])`` in PyTorch; the second output is empty unless columns mode saves the slice."""
    y = torch.nn.functional.linear(x, weight, bias)
    if save_slice and not rows:
        return y, x[:, :width].clone(memory_format=torch.contiguous_format)
    return y, x.new_empty(0)


def s2ft_backward_reference(
    grad_y: Tensor, saved: Tensor, weight: Tensor, width: int, rows: bool, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    """``(dx, dW_s)`` in PyTorch, empty where not needed. ``saved`` is x[:, :S] (columns) or x (rows)."""
    dx = dw = grad_y.new_empty(0)
    if need_dx:
        dx = grad_y @ weight
    if need_dw:
        dw = grad_y[:, :width].t() @ saved if rows else grad_y.t() @ saved
    return dx, dw


@reads_grad_shape
def s2ft_linear_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): for N tokens, in K, out O, slice width S::

        dx   = g W                           2·N·O·K   when x needs grad
        dW_s = gᵀ x[:, :S]   (columns)       2·N·O·S   when the slice trains
             = g[:, :S]ᵀ x   (rows)          2·N·S·K

    Tensor inputs: x, weight, [bias], weight_slice (the last edge).
    """
    width, rows, _, _, in_features = node.meta
    tokens, out_features = rows_and_features(grad_shape(node))
    slice_edge = len(node.next_functions) - 1
    dw = 2 * tokens * width * in_features if rows else 2 * tokens * out_features * width
    return [(2 * tokens * out_features * in_features, (0,)), (dw, (slice_edge,))]


register_op("s2ft_linear", {
    "torch": {"forward": s2ft_forward_reference, "backward": s2ft_backward_reference},
    # two paths (fastft.dispatch.choose_path): every product by cuBLAS, or the fused Triton kernels
    "triton": lazy("fastft.kernels.s2ft", **{
        "forward@cublas": "s2ft_forward_cublas", "forward@triton": "s2ft_forward",
        "backward@cublas": "s2ft_backward_cublas", "backward@triton": "s2ft_backward",
    }),
}, node_costs={custom_op_node("s2ft_linear"): s2ft_linear_backward_flops})


@torch.library.custom_op("fastft::s2ft_linear", mutates_args=())
def _s2ft_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_slice: Tensor, rows: bool, save_slice: bool
) -> tuple[Tensor, Tensor]:
    width = slice_width(weight_slice, rows)
    return implementation("s2ft_linear", "forward", x.device)(x, weight, bias, width, rows, save_slice)


@_s2ft_linear_op.register_fake
def _(x, weight, bias, weight_slice, rows, save_slice):
    width = slice_width(weight_slice, rows)
    saved = x.new_empty(x.shape[0], width) if (save_slice and not rows) else x.new_empty(0)
    return x.new_empty(x.shape[0], weight.shape[0]), saved


@torch.library.custom_op("fastft::s2ft_linear_backward", mutates_args=())
def _s2ft_linear_backward_op(
    grad_y: Tensor, saved: Tensor, weight: Tensor, width: int, rows: bool, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    return implementation("s2ft_linear", "backward", grad_y.device)(grad_y, saved, weight, width, rows, need_dx, need_dw)


@_s2ft_linear_backward_op.register_fake
def _(grad_y, saved, weight, width, rows, need_dx, need_dw):
    empty = grad_y.new_empty(0)
    dw_shape = (width, saved.shape[1]) if rows else (grad_y.shape[1], width)
    return (
        grad_y.new_empty(grad_y.shape[0], weight.shape[1]) if need_dx else empty,
        grad_y.new_empty(dw_shape) if need_dw else empty,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, weight_slice, rows, save_slice = inputs
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "s2ft_linear: the full weight and the bias are frozen (only weight_slice trains); "
            "call .requires_grad_(False) on them."
        )
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if need_dw and not rows and not save_slice:
        raise RuntimeError("s2ft_linear: weight_slice needs a gradient but save_slice=False kept no x[:, :S].")
    _, x_slice = output
    saved = (x if rows else x_slice) if need_dw else None
    ctx.save_for_backward(saved, weight if need_dx else None)
    ctx.meta = (slice_width(weight_slice, rows), rows, need_dx, need_dw, x.shape[1])


def _backward(ctx, grad_y, _grad_x_slice):
    saved, weight = ctx.saved_tensors
    width, rows, need_dx, need_dw, in_features = ctx.meta
    if saved is None:
        saved = grad_y.new_empty(0)
    if weight is None:
        weight = grad_y.new_empty(0, in_features)
    dx, dw = _s2ft_linear_backward_op(grad_y.contiguous(), saved, weight, width, rows, need_dx, need_dw)
    return dx if need_dx else None, None, None, dw if need_dw else None, None, None


_s2ft_linear_op.register_autograd(_backward, setup_context=_setup_context)


def s2ft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_slice: Tensor, rows: bool = False) -> Tensor:
    """``x Wᵀ + b`` over the last dimension of ``x``, training only ``weight_slice`` (see the module docstring).

    ``weight_slice`` holds the values of ``W[:, :S]`` (``rows=False``) or ``W[:S, :]`` (``rows=True``);
    everything must already be in ``x``'s dtype.
    """
    in_features = weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"s2ft_linear: input's last dimension is {x.shape[-1]}, the layer expects {in_features}")
    expected = (weight_slice.shape[0], in_features) if rows else (weight.shape[0], weight_slice.shape[1])
    width = slice_width(weight_slice, rows)
    if tuple(weight_slice.shape) != expected or not 0 < width <= weight.shape[0 if rows else 1]:
        what = "rows" if rows else "columns"
        raise ValueError(
            f"s2ft_linear: weight_slice {tuple(weight_slice.shape)} is not a slice of the first {what} of the "
            f"{tuple(weight.shape)} weight"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    save_slice = (not rows) and torch.is_grad_enabled() and weight_slice.requires_grad
    y, _ = _s2ft_linear_op(x2, weight, bias, weight_slice, rows, save_slice)
    return y.reshape(*lead, weight.shape[0])
