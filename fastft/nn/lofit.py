"""``LoFiTLinear``: LoFiT's per-head offsets on the input of an attention output projection (o_proj).

    z = [z_0, …, z_{h-1}]   (the query heads' attention outputs, the input of o_proj, K = h·d)
    z_i ← z_i + v_i         for each selected head i (v_i: d, trainable, starting at 0)
    y = z Wᵀ + b = z_orig Wᵀ + (b + Σ_i W[:, i·d:(i+1)·d] v_i)

The offsets are a bias of o_proj, exactly: the op (:mod:`fastft.ops.lofit_linear`) forms no shifted copy of
z and saves no activation. Heads are query heads (with grouped-query attention o_proj's input has one slice per
query head). The wrapped o_proj is kept untouched as ``base_layer``; unpatching restores it, merging folds
the offsets into its bias (``b' = b + W[:, c] v``; a bias is created where o_proj had none).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import copy_full_
from ..ops.lofit_linear import lofit_linear
from .layer import FastFTLayer, WrapsLinear


class LoFiTLinear(WrapsLinear, FastFTLayer):
    """Offsets on the selected heads' slices of an ``nn.Linear``'s input; see the module docstring.

    Args:
        base_layer: the attention output projection (``nn.Linear`` with a float weight).
        heads: the selected query-head indices.
        head_dim: the width of one head's slice of the input.
    """

    op = "lofit_linear"

    def __init__(self, base_layer: nn.Module, heads, head_dim: int):
        super().__init__()
        if not isinstance(base_layer, nn.Linear) or not base_layer.weight.is_floating_point():
            raise TypeError(f"LoFiT wraps an attention output projection that is an nn.Linear with a float weight; "
                            f"got {type(base_layer).__name__}.")
        heads = tuple(int(h) for h in heads)
        n_heads = base_layer.in_features // head_dim
        if head_dim <= 0 or base_layer.in_features % head_dim or not heads or min(heads) < 0 or max(heads) >= n_heads:
            raise ValueError(f"LoFiT: heads {list(heads)} with head_dim {head_dim} do not fit an input of "
                             f"{base_layer.in_features} features ({n_heads} heads).")
        self.base_layer = base_layer
        self.heads, self.head_dim = heads, head_dim
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lofit_offset = nn.Parameter(torch.zeros(len(heads), head_dim, device=weight.device, dtype=dtype))
        columns = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        self.register_buffer("columns", columns.to(weight.device), persistent=False)

    @property
    def kind(self) -> str:
        return "lofit"

    def report_detail(self) -> str:
        return f"heads={list(self.heads)} head_dim={self.head_dim}"

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        input_dtype = x.dtype
        base = self.base_layer
        weight, bias, offset = base.weight, base.bias, self.lofit_offset
        x, weight, offset = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight, offset))
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        y = lofit_linear(x, weight, bias, self.columns, offset)
        return y if y.dtype == input_dtype or torch.is_autocast_enabled(x.device.type) else y.to(input_dtype)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lofit_offset": self.lofit_offset}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {"lofit_offset": self.lofit_offset.detach()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"lofit_offset"}:
            raise ValueError(f"adapter state has keys {sorted(state)}, expected ['lofit_offset']")
        if state["lofit_offset"].shape != self.lofit_offset.shape:
            raise ValueError(f"lofit_offset: saved shape {tuple(state['lofit_offset'].shape)} != "
                             f"{tuple(self.lofit_offset.shape)}")
        with torch.no_grad():
            copy_full_(self.lofit_offset, state["lofit_offset"])

    def delta_bias(self) -> Tensor:
        """``W[:, c] v̄`` (out): what merging adds to the bias."""
        weight = self.base_layer.weight.detach()
        return weight[:, self.columns].to(self.lofit_offset.dtype) @ self.lofit_offset.detach().reshape(-1)

    def unpatched(self, merge: bool) -> nn.Module:
        base = self.base_layer
        if not merge:
            return base
        delta = self.delta_bias()
        with torch.no_grad():
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros(base.out_features, device=delta.device, dtype=base.weight.dtype),
                                         requires_grad=False)
            base.bias.copy_((base.bias.to(delta.dtype) + delta).to(base.bias.dtype))
        return base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, heads={list(self.heads)}, head_dim={self.head_dim}"
