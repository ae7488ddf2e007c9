"""``DSEELinear``: LoRA plus a trained sparse delta in one layer (DSEE).

    y = x (W + S)ᵀ + b + s · (x̃ Aᵀ) Bᵀ,      S: k trained entries (``delta_values``) at ``delta_indices``

The sparse part runs the ``sparse_delta_linear`` op (the base GEMM with S's terms; its gradient dv is an
SDDMM at the k positions, never a dense dW), and the low-rank term is added by two skinny torch matmuls
(autograd: saves x, which the sparse op keeps anyway, and xa). The positions are chosen once, in
:meth:`prepare` (before any weight changes): largest |W − W_r| (W_r the rank-r truncated SVD of W), largest
|W|, or random. Merging adds ``s·BA + S``; nothing of the base is rewritten while patched.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import DSEEConfig
from ..distributed import copy_full_
from ..ops.sparse_delta_linear import check_indices, sparse_delta_linear, sparse_support
from .lora import LoRALinear


def dsee_support(weight: Tensor, k: int, rank: int, how: str, seed: int) -> Tensor:
    """Sorted flat positions (int64 [k]) of the out×in ``weight`` chosen by ``how``."""
    w = weight.detach().float()
    if how == "random":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + w.shape[0] * 7919 + w.shape[1])
        picked = torch.randperm(w.numel(), generator=gen)[:k].to(w.device)
    else:
        if how == "residual":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            w = w - (u[:, :rank] * s[:rank]) @ vh[:rank]
        picked = torch.topk(w.abs().flatten(), k).indices
    return picked.sort().values


class DSEELinear(LoRALinear):
    """LoRA + sparse delta over a frozen linear layer (``DSEEConfig``); see the module docstring."""

    op = "sparse_delta_linear"  # the op that carries the base GEMM (the report's backend column)

    def __init__(self, base_layer: nn.Module, config: DSEEConfig, defer_attach: bool = False):
        if not isinstance(config, DSEEConfig):
            raise TypeError(f"DSEELinear needs a fastft.DSEEConfig, got {type(config).__name__}")
        super().__init__(base_layer, config, defer_attach=True)
        if self.is_4bit:
            raise ValueError("DSEEConfig: 4-bit bases are not supported by DSEELinear yet; patch a float model.")
        self.k = config.count(self.out_features, self.in_features)
        self.support_rule, self.seed = config.support, config.seed
        device = self.lora_A.device
        self.register_buffer("delta_indices", torch.zeros(self.k, dtype=torch.int64, device=device))
        self.delta_values = nn.Parameter(torch.zeros(self.k, device=device, dtype=self.lora_A.dtype))
        self._support = None
        if not defer_attach:
            self.attach()

    @property
    def kind(self) -> str:
        return "dsee"

    def report_detail(self) -> str:
        return super().report_detail() + f" sparse k={self.k} ({self.support_rule})"

    def prepare(self) -> None:
        """Choose the sparse positions from the base weight (raises on a NaN/inf weight), before any change."""
        super().prepare()
        if self._support is not None:
            return
        weight = self._weight()
        if weight.is_meta:
            raise ValueError("DSEEConfig chooses its sparse positions from the base weight, which is on the meta "
                             "device; patch after loading the weights.")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("DSEEConfig: the base weight holds NaN or inf; load a finite checkpoint.")
        with torch.no_grad():
            self.delta_indices.copy_(dsee_support(weight, self.k, self.r, self.support_rule, self.seed))
        self._support = sparse_support(self.delta_indices, (self.out_features, self.in_features))

    def _run_op(self, x, weight, bias, lora_A, lora_B, mask):
        values = self.delta_values if self.delta_values.dtype == x.dtype else self.delta_values.to(x.dtype)
        y = sparse_delta_linear(x, weight.detach(), None if bias is None else bias.detach(), None, values,
                                support=self._support)
        x_low = x if mask is None else x * mask * (1.0 / (1.0 - self.dropout_p))
        return y + self.scale * ((x_low @ lora_A.t()) @ lora_B.t())

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "delta_values": self.delta_values}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {**super().adapter_state_dict(), "delta_indices": self.delta_indices.detach(),
                "delta_values": self.delta_values.detach()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        indices, values = state.get("delta_indices"), state.get("delta_values")
        if indices is None or values is None or tuple(indices.shape) != (self.k,) or tuple(values.shape) != (self.k,):
            raise ValueError(f"DSEE adapter state needs delta_indices and delta_values of shape ({self.k},)")
        check_indices(indices.to(torch.int64), (self.out_features, self.in_features), what="DSEELinear")
        super().load_adapter_state_dict(state)  # checks the key set, loads A and B
        with torch.no_grad():
            self.delta_indices.copy_(indices)
            copy_full_(self.delta_values, values)
        self._support = sparse_support(self.delta_indices, (self.out_features, self.in_features))

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self._support is not None:
            self._support = self._support.to(self.delta_indices.device)
        return module

    def delta_weight(self) -> Tensor:
        """``s·BA + S`` (out×in): what merging adds."""
        delta = super().delta_weight().clone()
        delta.view(-1).index_add_(0, self.delta_indices, self.delta_values.detach().to(delta.dtype))
        return delta

    def peft_factors(self):
        raise ValueError("fastft.export_peft: a DSEE adapter has a sparse part, which a PEFT LoRA adapter cannot hold. "
                         "Use fastft.save / fastft.load, or fastft.unpatch(model, merge=True) and save the merged model.")

    def merge_and_restart(self) -> None:
        raise ValueError("Chain of LoRA does not restart DSEE adapters (the sparse part would be merged too); "
                         "use LoRAConfig with COLA.")
