"""``SparseDeltaLinear``: a drop-in for ``nn.Linear`` / bitsandbytes ``Linear4bit`` / ``Conv1D`` that trains a
k-sparse update of its frozen weight.

    y = x (W + ΔW)ᵀ + b,      ΔW.flatten()[delta_indices[j]] = f(delta_values)[j],  zero elsewhere

``delta_indices`` (buffer, int64 [k]) are flat row-major positions ``row·in + col`` of the *out×in* weight
(for a ``Conv1D``, of its transposed view), sorted ascending and unique; ``delta_values`` (an
``nn.Parameter`` [k]) are the trained deltas, ``f`` is ``value_transform`` (None: the identity), the hook
methods plug into (Diff Pruning's hard-concrete gates, MFT's straight-through masks): the op uses
``effective_values()``. The op (``fastft.ops.sparse_delta_linear``) never builds a dense gradient: dv is an
SDDMM at the k positions and only x is saved for it.

dtype: ``delta_values`` is float32 by default for half-precision and 4-bit bases (optimizers step in full
precision, as LoRA's rule), else the weight's dtype; pass ``dtype=`` to choose (e.g. the weight's bfloat16).
The op computes in the activation dtype (the autocast dtype, or a 4-bit layer's ``compute_dtype``).

Re-selection (SpIEL, SaRA, LT-SFT): :meth:`set_support` changes the positions in place, same k, same
Parameter object, and says which slots changed (reset their optimizer state). Candidates:
:meth:`set_candidates` adds extra positions whose gradient the backward accumulates (across steps, into a
tensor no optimizer sees) without changing the forward; :meth:`candidate_gradients` reads it.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..bnb import four_bit_weight, is_linear4bit, requantize_like
from ..ops.sparse_delta_linear import SparseSupport, check_indices, sparse_delta_linear, sparse_support
from ..targets import is_conv1d, linear_features, out_in_weight
from .layer import FastFTLayer, LinearOperands, WrapsLinear
from .lora import adapter_dtype

_SUPPORT_BUFFERS = ("rows", "cols", "row_ptr", "col_order", "col_ptr")


def _check_base(layer: nn.Module) -> None:
    if is_linear4bit(layer):
        four_bit_weight(layer)  # raises now if the layer holds no quantization state
        return
    if (isinstance(layer, nn.Linear) or is_conv1d(layer)) and layer.weight.is_floating_point():
        return
    raise TypeError(
        "fastft sparse deltas patch nn.Linear, transformers' Conv1D (float weights) and bitsandbytes Linear4bit "
        f"layers; got {type(layer).__name__}."
    )


def _transform_key(name: str) -> str:
    """The adapter-state key of a value-transform tensor: no dots (``fastft.save`` keys are
    ``<module name>.<tensor name>`` and ``fastft.load`` splits them at the last dot)."""
    return "value_transform_" + name.replace(".", "_")


class SparseDeltaLinear(LinearOperands, WrapsLinear, FastFTLayer):
    """A trainable sparse ΔW over a frozen linear layer; see the module docstring.

    Args:
        base_layer: the ``nn.Linear``, ``Conv1D`` or quantized bitsandbytes ``Linear4bit`` (kept as a child).
        indices: int64 [k] flat positions (row·in + col) of the out×in weight, sorted and unique.
        values: initial deltas [k] (default zeros).
        dtype: the dtype of ``delta_values`` (default :func:`fastft.nn.lora.adapter_dtype`: float32 for half-precision and 4-bit bases, else the weight's).
    """

    op = "sparse_delta_linear"
    kind = "sparse"
    dense_path: Optional[bool] = None
    """The op's path: None follows ``fastft.ops.sparse_delta_linear.use_dense_delta`` (W + ΔW in a transient
    O×K buffer for float32 when N·k is large); False always keeps the sparse terms (no O×K buffer at all)."""

    def __init__(self, base_layer: nn.Module, indices: Tensor, values: Optional[Tensor] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        _check_base(base_layer)
        self.base_layer = base_layer
        self.is_4bit = is_linear4bit(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        device = base_layer.weight.device
        indices = self._checked_indices(indices, device)
        k = indices.numel()
        dtype = dtype or adapter_dtype(base_layer)
        self.register_buffer("delta_indices", indices)
        self.delta_values = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))
        if values is not None:
            self._copy_values(values)
        self.value_transform: Optional[nn.Module] = None
        self._candidate_values: Optional[Tensor] = None  # zero-valued leaf (not a Parameter: no optimizer sees it)
        self.register_buffer("candidate_indices", None, persistent=False)
        self._union: Optional[tuple[SparseSupport, Tensor]] = None
        self._build_support()
        self.support_moves: Optional[Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def k(self) -> int:
        return int(self.delta_indices.numel())

    def report_detail(self) -> str:
        detail = f"k={self.k} density={self.k / (self.out_features * self.in_features):.3%}"
        if self.value_transform is not None:
            detail += f" transform={type(self.value_transform).__name__}"
        return detail

    # ------------------------------------------------------------------ support
    def _checked_indices(self, indices: Tensor, device) -> Tensor:
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices, dtype=torch.int64)
        indices = indices.detach().to(device)
        check_indices(indices, self.shape, what=type(self).__name__)
        return indices.clone()

    def _copy_values(self, values: Tensor) -> None:
        values = torch.as_tensor(values)
        if tuple(values.shape) != (self.k,):
            raise ValueError(f"{type(self).__name__}: values must have shape ({self.k},) like the indices, got {tuple(values.shape)}")
        with torch.no_grad():
            self.delta_values.copy_(values.to(self.delta_values.device, self.delta_values.dtype))

    def _build_support(self) -> None:
        support = sparse_support(self.delta_indices, self.shape, check=False)
        for name in _SUPPORT_BUFFERS:
            self.register_buffer(name, getattr(support, name), persistent=False)
        self._union = None

    def support(self) -> SparseSupport:
        """The index structures of the active positions (rebuilt on :meth:`set_support`)."""
        return SparseSupport(self.delta_indices, self.rows, self.cols, self.row_ptr, self.col_order, self.col_ptr,
                             self.shape)

    def set_support(self, indices: Tensor, values: Optional[Tensor] = None) -> Tensor:
        """Move the k trained positions to ``indices`` (sorted, unique, same k), in place.

        ``delta_values`` stays the same Parameter object (its data is rewritten), so an optimizer keeps
        it. Without ``values``, a position present before keeps its delta (moved to its new slot) and a new
        one starts at zero. Returns a bool mask [k] of slots whose position changed: reset the optimizer
        state of those. ``support_moves`` [k] then holds, per new slot, the old slot of the same position
        (or -1), for a caller that would rather move the state along.
        """
        indices = self._checked_indices(indices, self.delta_indices.device)
        if indices.numel() != self.k:
            raise ValueError(f"{type(self).__name__}.set_support: k must stay {self.k}, got {indices.numel()} indices")
        old = self.delta_indices
        # old slot of each new position: old is sorted, so searchsorted finds it
        where = torch.searchsorted(old, indices).clamp_(max=max(self.k - 1, 0))
        present = old[where] == indices if self.k else torch.zeros(0, dtype=torch.bool, device=old.device)
        moves = torch.where(present, where, torch.full_like(where, -1))
        changed = indices != old
        with torch.no_grad():
            if values is None:
                carried = torch.where(present, self.delta_values.detach()[where],
                                      torch.zeros((), dtype=self.delta_values.dtype, device=old.device))
                self.delta_values.data.copy_(carried)
            else:
                self._copy_values(values)
            self.delta_indices.copy_(indices)
        self._build_support()
        self.support_moves = moves
        if self.candidate_indices is not None and bool(torch.isin(self.candidate_indices, indices).any()):
            self.set_candidates(None)
            warnings.warn("set_support: the new positions overlap the candidates; candidates cleared", stacklevel=2)
        return changed

    # --------------------------------------------------------------- candidates
    def set_candidates(self, indices: Optional[Tensor]) -> None:
        """Extra positions (disjoint from the active ones) whose gradient the backward accumulates into
        :meth:`candidate_gradients`; None removes them. They do not change the forward (value fixed at 0)."""
        if indices is None:
            self.candidate_indices = None
            self._candidate_values = None
            self._union = None
            return
        device = self.delta_indices.device
        indices = torch.as_tensor(indices, dtype=torch.int64).to(device)
        if indices.dim() != 1:
            raise ValueError("set_candidates: indices must be 1-D flat positions")
        indices = indices.sort().values
        check_indices(indices, self.shape, what="set_candidates")
        if bool(torch.isin(indices, self.delta_indices).any()):
            raise ValueError("set_candidates: candidates must not include active positions (they already get a gradient)")
        self.candidate_indices = indices
        self._candidate_values = torch.zeros(indices.numel(), device=device, dtype=self.delta_values.dtype,
                                             requires_grad=True)
        self._union = None

    def candidate_gradients(self) -> Optional[Tensor]:
        """The gradient accumulated at the candidates (sorted as ``candidate_indices``) since the last clear,
        or None (no candidates, or no backward yet)."""
        if self._candidate_values is None:
            return None
        return self._candidate_values.grad

    def clear_candidate_gradients(self) -> None:
        if self._candidate_values is not None:
            self._candidate_values.grad = None

    def _union_support(self) -> tuple[SparseSupport, Tensor]:
        """(support of active ∪ candidates, order) with ``union = cat(active, candidates)[order]``."""
        if self._union is None:
            both = torch.cat([self.delta_indices, self.candidate_indices])
            order = torch.argsort(both)
            self._union = (sparse_support(both[order], self.shape, check=False), order)
        return self._union

    # ------------------------------------------------------------------ forward
    def effective_values(self) -> Tensor:
        """The values the op uses: ``value_transform(delta_values)``, or ``delta_values``."""
        if self.value_transform is None:
            return self.delta_values
        return self.value_transform(self.delta_values)

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias, input_dtype = self._linear_operands(x)
        dtype = x.dtype
        values = self.effective_values()
        if self._candidate_values is not None and self.training and torch.is_grad_enabled():
            support, order = self._union_support()
            values = torch.cat([values, self._candidate_values.to(values.dtype)])[order]
        else:
            support = self.support()
        if values.dtype != dtype:
            values = values.to(dtype)
        if not self.is_4bit:
            weight = weight.detach()  # W and b are frozen here whatever their requires_grad says
        if bias is not None:
            bias = bias.detach()
        y = sparse_delta_linear(x, weight, bias, None, values, support=support, dense=self.dense_path)
        return y.to(input_dtype) if y.dtype != input_dtype else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # model.load_state_dict (e.g. a Trainer resuming a checkpoint) writes delta_indices in place: the index
        # structures derived from it must follow, or the forward would use the old support
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "delta_indices" in state_dict and not self.delta_indices.is_meta:
            check_indices(self.delta_indices, self.shape, what=f"{type(self).__name__} ({prefix}delta_indices)")
            self.set_candidates(None)
            self._build_support()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self._candidate_values is not None:  # not a registered tensor: move it along by hand
            moved = fn(self._candidate_values.detach()).to(self.delta_values.dtype)
            self._candidate_values = torch.zeros_like(moved).requires_grad_(True)
        self._union = None
        return module

    # ------------------------------------------------------------------ adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        params = {"delta_values": self.delta_values}
        if self.value_transform is not None:
            params.update({f"value_transform.{n}": p for n, p in self.value_transform.named_parameters()})
        return params

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """indices, values, the base's (out, in) shape, and the value transform's state (if any)."""
        state = {
            "delta_indices": self.delta_indices.detach().clone(),
            "delta_values": self.delta_values.detach().clone(),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }
        if self.value_transform is not None:
            state.update({_transform_key(n): t.detach().clone() for n, t in self.value_transform.state_dict().items()})
        return state

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`adapter_state_dict` output (any k: the support is replaced), checking before copying."""
        expected = {"delta_indices", "delta_values", "shape"}
        if self.value_transform is not None:
            expected |= {_transform_key(n) for n in self.value_transform.state_dict()}
        if set(state) != expected:
            raise ValueError(f"sparse delta state has keys {sorted(state)}, expected {sorted(expected)}")
        shape = tuple(int(s) for s in state["shape"].tolist())
        if shape != self.shape:
            raise ValueError(f"the saved sparse delta is for a {shape[0]}×{shape[1]} weight, this layer is {self.shape}")
        indices = self._checked_indices(state["delta_indices"].to(torch.int64), self.delta_indices.device)
        values = state["delta_values"]
        if tuple(values.shape) != (indices.numel(),):
            raise ValueError(f"delta_values has shape {tuple(values.shape)}, delta_indices {tuple(indices.shape)}")
        if self.value_transform is not None:
            transform_state = {n: state[_transform_key(n)] for n in self.value_transform.state_dict()}
            self.value_transform.load_state_dict(transform_state)
        with torch.no_grad():
            if indices.numel() == self.k:
                self.delta_indices.copy_(indices)
                self.delta_values.copy_(values.to(self.delta_values.device, self.delta_values.dtype))
            else:
                self.delta_indices = indices
                self.delta_values.data = values.to(self.delta_values.device, self.delta_values.dtype).clone()
        self.set_candidates(None)
        self._build_support()

    def regularization(self) -> Optional[Tensor]:
        """The value transform's loss term, ``value_transform.regularization(self)`` (Diff Pruning's
        expected-L0 penalty, SaRA's nuclear norm), or None."""
        term = getattr(self.value_transform, "regularization", None)
        return term(self) if callable(term) else None

    def delta_weight(self) -> Tensor:
        """Dense ΔW (out×in, ``delta_values``' dtype) of the effective values: what merging adds."""
        with torch.no_grad():
            values = self.effective_values().detach()
            delta = torch.zeros(self.out_features * self.in_features, dtype=values.dtype, device=values.device)
            delta.index_put_((self.delta_indices,), values)
        return delta.view(self.out_features, self.in_features)

    def unpatched(self, merge: bool) -> nn.Module:
        """The plain layer: ``W[idx] += v`` (``merge``; exact in the weight's dtype) or untouched.

        A 4-bit base is dequantized, merged and re-quantized (with a warning: that rounds to 4 bits again).
        """
        base = self.base_layer
        if not merge:
            return base
        with torch.no_grad():
            values = self.effective_values().detach()
        if self.is_4bit:
            warnings.warn(
                "fastft.unpatch(merge=True) on a 4-bit base: the weight is dequantized, the sparse delta added and the "
                "weight re-quantized, which rounds the merged weight to 4 bits again.",
                stacklevel=3,
            )
            merged = four_bit_weight(base).dequantize(torch.float32)
            merged.view(-1).index_add_(0, self.delta_indices.to(merged.device), values.to(merged.device, torch.float32))
            return requantize_like(base, merged)
        with torch.no_grad():
            weight = out_in_weight(base)
            rows, cols = self.rows.to(weight.device), self.cols.to(weight.device)
            current = weight[rows, cols]
            weight[rows, cols] = (current.to(torch.promote_types(current.dtype, values.dtype))
                                  + values.to(weight.device)).to(weight.dtype)
        return base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}"
