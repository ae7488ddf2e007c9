"""The sparse-delta linear op: a frozen dense (or 4-bit) weight plus a trainable k-sparse update.

For x (N×K), a frozen weight W (O×K, dense or bitsandbytes 4-bit), an optional frozen bias b (O), and
k trainable values v at flat row-major positions p_j = r_j·K + c_j (``indices``: int64, sorted
ascending, unique)::

    ΔW[r_j, c_j] = v_j  (zero elsewhere)
    y  = x (W + ΔW)ᵀ + b        = x Wᵀ + b  +  S(x),       S(x)[:, r] = Σ_{j: r_j = r} v_j x[:, c_j]

Backward, for the upstream gradient g = ∂L/∂y (N×O)::

    dx = g (W + ΔW)             = g W  +  T(g),            T(g)[:, c] = Σ_{j: c_j = c} v_j g[:, r_j]
    dv_j = Σ_n g[n, r_j] x[n, c_j]                          (an SDDMM: k dot products over the tokens)

Never the dense O×K product gᵀx. W and b receive no gradient.

What is saved for backward: ``x`` (only when v needs a gradient) and the index structures of the support
(rows, cols, the CSR row pointer, the CSC permutation and column pointer: int64, O(k + O + K)); W (a
parameter, kept by the model anyway, re-dequantized for a 4-bit base) and v (k entries) are referenced.

Paths. The frozen GEMMs (x Wᵀ, g W) always go through torch's matmuls (cuBLAS on a GPU). The sparse terms
S and T run either *sparse* (``torch.sparse.mm`` of the CSR matrix of the slots in PyTorch; the CSR and CSC
gather kernels in ``fastft.kernels.sparse_delta``) or *dense*: ΔW is scattered into a transient copy of W (or into the
dequantized 4-bit weight, which is a fresh buffer anyway), and one GEMM computes x (W + ΔW)ᵀ. The dense
path is chosen by :func:`use_dense_delta`: only when the compute dtype is float32 or float64 (in half
precision W + ΔW would round small deltas away against W's magnitude) and the sparse term's work N·k
is at least :data:`DENSE_RATIO` times the copy's O·K (measured on the CPU, predicted for CUDA; see its comment).
dv is always the SDDMM.

Registered as the ``torch.library`` ops ``fastft::sparse_delta_linear`` and
``fastft::sparse_delta_linear_backward`` (with fake kernels, so ``torch.compile`` traces through them), and
``fastft::sampled_gradient`` (the SDDMM alone, for gradients at candidate positions). The PyTorch code
here is the reference and runs on every device; the Triton backend (CUDA, or the interpreter) replaces
the two sparse terms and the SDDMM with kernels and keeps the GEMMs in torch.

FLOP formula: :func:`sparse_delta_linear_backward_flops`, registered with the op (``node_costs=``) for
``fastft.policies.cost``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node
from .dequantize_4bit import FourBitWeight, dequantize_4bit

# The dense path's threshold: dense when N·k >= DENSE_RATIO[device type] · O·K (and the dtype is float32/float64).
# CPU, measured on this workplace's shared 2-core machine (torch 2.13, float32, O = K = 1024, 7 interleaved runs,
# load average 12; forward time relative to the frozen GEMM x Wᵀ alone, median): N·k/(O·K) = 0.51: sparse-term
# path (torch.sparse.mm) 2.6x, dense add 1.1x; 2.6: 2.5x, 1.4x; 5.1: 1.9x, 1.1x; 51: 2.3x, 1.3x. The copy of W
# wins from the smallest ratio measured, 0.5. CUDA: predicted, not measured (no GPU here): the copy moves
# 2·O·K·4 bytes, the gather kernel about N·k·8, so the crossover is near N·k = O·K; 4 leaves room for the
# gather's irregular reads being slower than the copy's streaming ones.
DENSE_RATIO = {"cpu": 0.5, "cuda": 4.0}
_CHUNK = 1 << 18  # elements of one gathered (tokens × slots) block in the PyTorch SDDMM
_TOKEN_BLOCK = 1 << 18  # elements of one (tokens × features) block the PyTorch sparse terms and SDDMM transpose


# ------------------------------------------------------------------------------------------ support
@dataclass
class SparseSupport:
    """The index structures of a support of k positions in an O×K matrix (computed once per support).

    ``indices``: flat row-major positions (sorted, unique); ``rows``/``cols``: their coordinates (CSR
    order, the same order as the values); ``row_ptr`` (O+1): slots of row r are ``row_ptr[r]:row_ptr[r+1]``;
    ``col_order`` (k): the slots sorted by column (stable), ``col_ptr`` (K+1) its column pointer (CSC).
    """

    indices: Tensor
    rows: Tensor
    cols: Tensor
    row_ptr: Tensor
    col_order: Tensor
    col_ptr: Tensor
    shape: tuple[int, int]

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    def to(self, device) -> "SparseSupport":
        move = lambda t: t.to(device)  # noqa: E731
        return SparseSupport(*(move(t) for t in (self.indices, self.rows, self.cols, self.row_ptr,
                                                   self.col_order, self.col_ptr)), self.shape)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.indices, self.rows, self.cols, self.row_ptr, self.col_order, self.col_ptr


def check_indices(indices: Tensor, shape: tuple[int, int], what: str = "sparse_delta_linear") -> None:
    """Raise ``ValueError`` unless ``indices`` is a 1-D int64 tensor of sorted, unique positions in [0, O·K)."""
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        got = f"{indices.dtype} of shape {tuple(indices.shape)}" if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"{what}: indices must be a 1-D int64 tensor of flat positions (row·in + col), got {got}")
    size = shape[0] * shape[1]
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= size:
        raise ValueError(
            f"{what}: indices must lie in [0, {size}) for a {shape[0]}×{shape[1]} weight; got "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    steps = indices[1:] - indices[:-1]
    if bool((steps == 0).any()):
        raise ValueError(f"{what}: indices hold duplicates; each position may appear once (torch.unique them)")
    if bool((steps < 0).any()):
        raise ValueError(f"{what}: indices must be sorted ascending (indices.sort().values, values permuted alike)")


def sparse_support(indices: Tensor, shape: tuple[int, int], check: bool = True) -> SparseSupport:
    """The :class:`SparseSupport` of ``indices`` in an ``shape`` = (O, K) matrix (validated unless ``check=False``)."""
    out_features, in_features = int(shape[0]), int(shape[1])
    if check:
        check_indices(indices, (out_features, in_features))
    rows = torch.div(indices, in_features, rounding_mode="floor")
    cols = indices - rows * in_features
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=indices.device)
    row_ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    col_order = torch.sort(cols, stable=True).indices
    col_ptr = torch.zeros(in_features + 1, dtype=torch.int64, device=indices.device)
    col_ptr[1:] = torch.bincount(cols, minlength=in_features).cumsum(0)
    return SparseSupport(indices, rows, cols, row_ptr, col_order, col_ptr, (out_features, in_features))


def use_dense_delta(tokens: int, k: int, out_features: int, in_features: int, dtype: torch.dtype,
                    device_type: str = "cpu") -> bool:
    """The path rule of the module docstring: scatter ΔW into a copy of W instead of the sparse terms."""
    ratio = DENSE_RATIO.get(device_type, DENSE_RATIO["cuda"])
    return dtype in (torch.float32, torch.float64) and k > 0 and tokens * k >= ratio * out_features * in_features


# ------------------------------------------------------------------------------------- reference
def _dense_weight(weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int,
                  shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    if absmax is None:
        return weight
    return dequantize_4bit(weight, absmax, code, blocksize, shape, dtype)


def _with_delta(w: Tensor, fresh: bool, indices: Tensor, values: Tensor) -> Tensor:
    """W + ΔW as a new tensor (or in place into ``w`` when it is a fresh buffer, e.g. a dequantized weight)."""
    out = w if fresh else w.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_add_(0, indices, values.to(out.dtype))
    return out


def _chunk(tokens: int) -> int:
    return max(1, _CHUNK // max(1, tokens))


def _token_block(*features: int) -> int:
    """Tokens per block, so a transposed block of activations stays within _TOKEN_BLOCK elements (1 MiB fp32):
    the reference's transients are bounded by blocks, not by N×K."""
    return max(1, _TOKEN_BLOCK // max(1, *features))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sparse_term_reference(out: Tensor, src: Tensor, ptr: Tensor, order: Optional[Tensor], idx: Tensor,
                          values: Tensor) -> Tensor:
    """``out[:, t] += Σ_{p in ptr[t]:ptr[t+1]} values[s_p] · src[:, idx[s_p]]`` in place, ``s_p = order[p]`` (or p):
    the forward's S(x) with the CSR row pointer, dx's T(g) with the CSC permutation (the kernels' contract).

    With more slots than min(T, S): one ``torch.sparse.mm`` of the T×S CSR matrix these slots form with ``srcᵀ``,
    in float32 (float64 for float64; the CPU's sparse product has no half kernels). Measured on the CPU against
    gathers: 53 ms against 114 ms (rows of srcᵀ gathered, ``index_add_``) and 1,448 ms (columns of src gathered),
    N = 512, O = K = 2048, k = 0.5%. With at most min(T, S) slots (DSEE's few entries): columns of src gathered
    and added with ``index_add_``, no transposed copy: measured 2026-12-07, 0.05 ms against 0.51 ms at N = O = K
    = 512, k = 64, and 1.1 against 1.8 ms at N = 512, O = K = k = 2048. Transients: one block of tokens at a time
    (at most 1 MiB of float32 a block, or a block's tokens × k).
    """
    if values.numel() == 0 or out.shape[0] == 0:
        return out
    acc = _acc(out.dtype)
    if order is not None:
        idx, values = idx.index_select(0, order), values.index_select(0, order)
    if values.numel() <= min(out.shape[1], src.shape[1]):
        targets = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr[1:] - ptr[:-1])
        weights = values.to(acc)
        block = _token_block(out.shape[1], src.shape[1])
        for start in range(0, out.shape[0], block):
            stop = min(out.shape[0], start + block)
            term = src[start:stop].index_select(1, idx).to(acc) * weights
            part = out[start:stop]
            if out.dtype == acc:
                part.index_add_(1, targets, term)
            else:
                part.copy_(part.to(acc).index_add_(1, targets, term))
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(ptr, idx, values.to(acc), (out.shape[1], src.shape[1]), check_invariants=False)
    block = _token_block(out.shape[1], src.shape[1])
    for start in range(0, out.shape[0], block):
        stop = min(out.shape[0], start + block)
        term = torch.sparse.mm(matrix, src[start:stop].t().to(acc)).t()
        part = out[start:stop]
        if out.dtype == acc:
            part.add_(term)
        else:
            part.copy_(part.to(acc).add_(term))
    return out


def sampled_gradient_reference(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``dv[j] = Σ_n grad_y[n, rows[j]] · x[n, cols[j]]`` (float32 accumulation for half inputs), gathering rows
    of the transposes of one block of tokens at a time, in blocks of slots (transients: one transposed token
    block of g and of x, at most 1 MiB each in float32, and one block of slots; never O×K). With at most
    min(O, K) slots, columns of g and x are gathered instead (no transposed copies): measured 2026-12-07,
    0.06 ms against 0.39 ms at N = O = K = 512, k = 64; 1.5 against 2.5 ms at N = 512, O = K = k = 2048."""
    k = rows.numel()
    acc = _acc(grad_y.dtype)
    out = torch.zeros(k, dtype=acc, device=grad_y.device)
    if k == 0:
        return out.to(grad_y.dtype)
    tokens = grad_y.shape[0]
    block = _token_block(grad_y.shape[1], x.shape[1])
    if k <= min(grad_y.shape[1], x.shape[1]):
        for first in range(0, tokens, block):
            last = min(tokens, first + block)
            g_cols = grad_y[first:last].index_select(1, rows).to(acc)
            out += (g_cols * x[first:last].index_select(1, cols).to(acc)).sum(0)
        return out.to(grad_y.dtype)
    for first in range(0, tokens, block):
        last = min(tokens, first + block)
        g_t = grad_y[first:last].t().to(acc).contiguous()
        x_t = x[first:last].t().to(acc).contiguous()
        step = _chunk(last - first)
        for start in range(0, k, step):
            stop = min(k, start + step)
            out[start:stop] += (g_t.index_select(0, rows[start:stop]) * x_t.index_select(0, cols[start:stop])).sum(1)
    return out.to(grad_y.dtype)


def sparse_delta_forward_reference(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], values: Tensor, indices: Tensor, rows: Tensor, cols: Tensor, row_ptr: Tensor,
    col_order: Tensor, col_ptr: Tensor, dense: bool,
) -> Tensor:
    """y of the module docstring in PyTorch (the GEMM by torch.matmul, the sparse term by gather/index_add)."""
    w = _dense_weight(weight, absmax, code, blocksize, (out_features, x.shape[1]), x.dtype)
    if dense:
        return torch.nn.functional.linear(x, _with_delta(w, absmax is not None, indices, values), bias)
    y = torch.nn.functional.linear(x, w, bias)
    return sparse_term_reference(y, x, row_ptr, None, cols, values)


def sparse_delta_backward_reference(
    grad_y: Tensor, x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int,
    in_features: int, values: Tensor, indices: Tensor, rows: Tensor, cols: Tensor, row_ptr: Tensor,
    col_order: Tensor, col_ptr: Tensor, dense: bool, need_dx: bool, need_dv: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dv) of the module docstring in PyTorch, empty where not needed."""
    dx = dv = None
    if need_dx:
        w = _dense_weight(weight, absmax, code, blocksize, (grad_y.shape[1], in_features), grad_y.dtype)
        if dense:
            dx = grad_y @ _with_delta(w, absmax is not None, indices, values)
        else:
            dx = sparse_term_reference(grad_y @ w, grad_y, col_ptr, col_order, rows, values)
    if need_dv:
        dv = sampled_gradient_reference(grad_y, x, rows, cols)
    return (dx if dx is not None else grad_y.new_empty(0)), (dv if dv is not None else grad_y.new_empty(0))


def sparse_delta_linear_backward_flops(node, grad_shape=None) -> list[tuple[int, tuple[int, ...]]]:
    """FLOP formula of the op's backward (:mod:`fastft.node_costs`; reads only the node's ``meta``, not
    ``grad_shape``): for N tokens, in K, out O, k values, 2 FLOPs per multiply-add::

        dx = g W + T(g)     2·N·O·K + 2·N·k   when x needs grad   (dense path: 2·N·O·K)
        dv = SDDMM          2·N·k             when v trains

    Never the 2·N·O·K of a dense weight gradient. The node's edges are its tensor inputs: x, weight,
    [absmax, code], [bias], values, then the six index tensors — x is edge 0, values the seventh from the end.
    The forward costs 2·N·O·K + 2·N·k (sparse path) or 2·N·O·K.
    """
    _blocksize, in_features, k, dense, _need_dx, _need_dv, out_features, tokens = node.meta
    dx = 2 * tokens * out_features * in_features + (0 if dense else 2 * tokens * k)
    return [(dx, (0,)), (2 * tokens * k, (len(node.next_functions) - 7,))]


register_op("sparse_delta_linear", {
    "torch": {"forward": sparse_delta_forward_reference, "backward": sparse_delta_backward_reference,
              "sddmm": sampled_gradient_reference},
    # the GEMMs stay in torch (cuBLAS); the kernels compute the sparse terms and the SDDMM
    "triton": lazy("fastft.kernels.sparse_delta", forward="sparse_delta_forward",
                   backward="sparse_delta_backward", sddmm="sampled_gradient"),
}, node_costs={custom_op_node("sparse_delta_linear"): sparse_delta_linear_backward_flops})


# ------------------------------------------------------------------------------------------ the op
@torch.library.custom_op("fastft::sparse_delta_linear", mutates_args=())
def _sparse_delta_linear_op(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], values: Tensor, indices: Tensor, rows: Tensor, cols: Tensor, row_ptr: Tensor,
    col_order: Tensor, col_ptr: Tensor, dense: bool,
) -> Tensor:
    return implementation("sparse_delta_linear", "forward", x.device)(
        x, weight, absmax, code, blocksize, out_features, bias, values, indices, rows, cols, row_ptr, col_order,
        col_ptr, dense)


@_sparse_delta_linear_op.register_fake
def _(x, weight, absmax, code, blocksize, out_features, bias, values, indices, rows, cols, row_ptr, col_order,
      col_ptr, dense):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("fastft::sparse_delta_linear_backward", mutates_args=())
def _sparse_delta_linear_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int,
    in_features: int, values: Tensor, indices: Tensor, rows: Tensor, cols: Tensor, row_ptr: Tensor,
    col_order: Tensor, col_ptr: Tensor, dense: bool, need_dx: bool, need_dv: bool,
) -> tuple[Tensor, Tensor]:
    return implementation("sparse_delta_linear", "backward", grad_y.device)(
        grad_y, x, weight, absmax, code, blocksize, in_features, values, indices, rows, cols, row_ptr, col_order,
        col_ptr, dense, need_dx, need_dv)


@_sparse_delta_linear_backward_op.register_fake
def _(grad_y, x, weight, absmax, code, blocksize, in_features, values, indices, rows, cols, row_ptr, col_order,
      col_ptr, dense, need_dx, need_dv):
    return (grad_y.new_empty(grad_y.shape[0], in_features) if need_dx else grad_y.new_empty(0),
            grad_y.new_empty(values.shape[0]) if need_dv else grad_y.new_empty(0))


@torch.library.custom_op("fastft::sampled_gradient", mutates_args=())
def _sampled_gradient_op(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return implementation("sparse_delta_linear", "sddmm", grad_y.device)(grad_y, x, rows, cols)


@_sampled_gradient_op.register_fake
def _(grad_y, x, rows, cols):
    return grad_y.new_empty(rows.shape[0])


def _setup_context(ctx, inputs, output):
    (x, weight, absmax, code, blocksize, out_features, bias, values, indices, rows, cols, row_ptr, col_order,
     col_ptr, dense) = inputs
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[6]:
        raise RuntimeError(
            "sparse_delta_linear: the weight and the bias are frozen (only the sparse values train); "
            "call .requires_grad_(False) on them."
        )
    need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[7]
    ctx.save_for_backward(x if need_dv else None, weight if need_dx else None, absmax, code, values,
                          indices, rows, cols, row_ptr, col_order, col_ptr)
    ctx.meta = (blocksize, x.shape[1], values.shape[0], dense, need_dx, need_dv, out_features, x.shape[0])


def _backward(ctx, grad_y):
    x, weight, absmax, code, values, indices, rows, cols, row_ptr, col_order, col_ptr = ctx.saved_tensors
    blocksize, in_features, _k, dense, need_dx, need_dv, _out, _tokens = ctx.meta
    if x is None:
        x = grad_y.new_empty(0, in_features)
    if weight is None:
        weight = grad_y.new_empty(0, in_features)
    dx, dv = _sparse_delta_linear_backward_op(
        grad_y.contiguous(), x, weight, absmax, code, blocksize, in_features, values, indices, rows, cols, row_ptr,
        col_order, col_ptr, dense, need_dx, need_dv)
    return (dx if need_dx else None, None, None, None, None, None, None, dv if need_dv else None,
            None, None, None, None, None, None, None)


_sparse_delta_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public API
def _flat(x: Tensor, features: int) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, features)
    return x2 if x2.is_contiguous() else x2.contiguous()


def sparse_delta_linear(
    x: Tensor,
    weight: Union[Tensor, FourBitWeight],
    bias: Optional[Tensor],
    indices: Optional[Tensor],
    values: Tensor,
    support: Optional[SparseSupport] = None,
    dense: Optional[bool] = None,
) -> Tensor:
    """``x (W + ΔW)ᵀ + b`` over the last dimension of ``x`` (see the module docstring).

    ``weight`` is a dense (out×in) tensor of ``x``'s dtype or a :class:`~fastft.ops.dequantize_4bit.FourBitWeight`;
    ``values`` and ``bias`` must already be in ``x``'s dtype. ``indices``: int64 [k], flat row-major, sorted,
    unique (checked, which reads them on the host); pass a precomputed ``support`` (:func:`sparse_support`)
    instead to skip the check and the index build (``indices`` may then be None). ``dense`` forces the path
    (None: :func:`use_dense_delta`).
    """
    shape = tuple(weight.shape) if isinstance(weight, FourBitWeight) else (weight.shape[0], weight.shape[1])
    out_features, in_features = int(shape[0]), int(shape[1])
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_delta_linear: input's last dimension is {x.shape[-1]}, the layer expects {in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"sparse_delta_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if support is None:
        if indices is None:
            raise ValueError("sparse_delta_linear: give indices (or a precomputed support)")
        support = sparse_support(indices, (out_features, in_features))
    elif support.shape != (out_features, in_features):
        raise ValueError(f"sparse_delta_linear: the support is for a {support.shape} weight, not {shape}")
    if values.dim() != 1 or values.shape[0] != support.k:
        raise ValueError(f"sparse_delta_linear: values must have shape ({support.k},) like indices, got {tuple(values.shape)}")
    x2 = _flat(x, in_features)
    if dense is None:
        dense = use_dense_delta(x2.shape[0], support.k, out_features, in_features, x2.dtype, x2.device.type)
    if isinstance(weight, FourBitWeight):
        head = (x2, weight.packed, weight.absmax, weight.code, weight.blocksize, out_features)
    else:
        head = (x2, weight, None, None, 0, out_features)
    y = _sparse_delta_linear_op(*head, bias, values, *support.tensors(), bool(dense))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def sampled_gradient(grad_y: Tensor, x: Tensor, indices: Union[Tensor, SparseSupport],
                     shape: Optional[tuple[int, int]] = None) -> Tensor:
    """``dv[j] = Σ_n grad_y[n, r_j] · x[n, c_j]`` for the k positions ``indices`` (the SDDMM alone, no dense
    gradient): the gradient a zero-valued delta at those positions would get. ``grad_y`` (…×O) and ``x``
    (…×K) have the same leading dimensions; ``indices`` need not be sorted here (a support may be given)."""
    out_features, in_features = grad_y.shape[-1], x.shape[-1]
    if shape is not None and tuple(shape) != (out_features, in_features):
        raise ValueError(f"sampled_gradient: grad_y and x give a {out_features}×{in_features} weight, not {shape}")
    if grad_y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"sampled_gradient: grad_y {tuple(grad_y.shape)} and x {tuple(x.shape)} differ in tokens")
    if isinstance(indices, SparseSupport):
        rows, cols = indices.rows, indices.cols
    else:
        if indices.dtype != torch.int64 or indices.dim() != 1:
            raise ValueError("sampled_gradient: indices must be a 1-D int64 tensor of flat positions")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= out_features * in_features):
            raise ValueError(f"sampled_gradient: indices must lie in [0, {out_features * in_features})")
        rows = torch.div(indices, in_features, rounding_mode="floor")
        cols = indices - rows * in_features
    g2, x2 = _flat(grad_y, out_features), _flat(x.to(grad_y.dtype), in_features)
    return _sampled_gradient_op(g2, x2, rows, cols)
