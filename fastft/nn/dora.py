"""``DoRALinear``: LoRA with a learned magnitude per output row (DoRA; QDoRA over a bitsandbytes 4-bit base).

    y = g ⊙ (x Wᵀ + s · dropout(x) Aᵀ Bᵀ) + b,      g = m / ‖W + s·BA‖  (one norm per output row)

(with dropout PEFT's form: ``y = x Wᵀ + b + (g-1) ⊙ x̃ Wᵀ + g ⊙ s·x̃ Aᵀ Bᵀ``, x̃ the dropped input; see
:mod:`fastft.ops.dora`). A (``lora_A``, r×in), B (``lora_B``, out×r) and the magnitude m
(``lora_magnitude_vector``, out) train; m starts at the row norms ``‖W + s·BA‖``, so DoRA equals LoRA at
init. The row norm comes from the low-rank factors (``‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i A Aᵀ B_iᵀ``) with
``‖W_i‖²`` computed once here (for a 4-bit base from its dequantized weight; the base is frozen) and
kept as the non-persistent buffer ``weight_sq_norm``; W + s·BA is never formed while training. By default
the norm is detached (DoRA paper, section 4.3; PEFT): gradients reach A and B only through the numerator.
``LoRAConfig(dora_detach_norm=False)`` gives the exact gradient through the norm as well.

A row whose norm is zero (an all-zero row of W with B's row zero) divides by ``fastft.ops.dora_row_norm.NORM_EPS``
instead: its magnitude starts at that epsilon, g = 1, and outputs and gradients stay finite (PEFT gives
NaN there).

Build one with ``LoRALinear.from_linear(layer, LoRAConfig(dora=True))`` (what ``fastft.patch`` does) or
``DoRALinear(layer, config)``. Parameter names and shapes are PEFT's (``lora_magnitude_vector`` is PEFT's
``lora_magnitude_vector.<adapter>.weight``), so ``fastft.export_peft`` writes a ``use_dora=True`` adapter.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..bnb import four_bit_weight, requantize_like
from ..config import LoRAConfig
from ..distributed import copy_full_
from ..ops.dora import dora_linear
from ..ops.dora_row_norm import NORM_EPS, dora_row_norm, norm_dtype
from .lora import LoRALinear, adapter_dtype


def row_sq_norms(weight: Tensor, dtype: torch.dtype, rows_per_chunk_elements: int = 1 << 22) -> Tensor:
    """``‖W_i‖²`` of every row in ``dtype``, a few rows at a time (no full-size temporary)."""
    out = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)
    step = max(1, rows_per_chunk_elements // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = weight[start:start + step].to(dtype)
        out[start:start + step] = (rows * rows).sum(1)
    return out


class DoRALinear(LoRALinear):
    """DoRA over a frozen ``nn.Linear`` or ``Linear4bit``; see the module docstring.

    Args:
        base_layer: the layer to adapt (kept as the child ``base_layer``).
        config: a :class:`fastft.LoRAConfig` with ``dora=True`` (r, alpha, dropout, rslora, train_a, init and
            dora_detach_norm are used here).
    """

    op = "dora_linear"
    supports_dora = True

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, defer_attach: bool = False):
        if isinstance(config, LoRAConfig) and not config.dora:
            raise ValueError("DoRALinear needs LoRAConfig(dora=True); for plain LoRA use fastft.nn.LoRALinear.")
        super().__init__(base_layer, config, defer_attach=True)
        self.detach_norm = config.dora_detach_norm
        device = base_layer.weight.device
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(self.out_features, device=device, dtype=adapter_dtype(base_layer))
        )
        dense64 = not self.is_4bit and base_layer.weight.dtype == torch.float64
        self.register_buffer(
            "weight_sq_norm",
            torch.zeros(self.out_features, device=device, dtype=torch.float64 if dense64 else torch.float32),
            persistent=False,
        )
        if not defer_attach:
            self.attach()

    @property
    def kind(self) -> str:
        return "qdora" if self.is_4bit else "dora"

    def report_detail(self) -> str:
        detail = super().report_detail()
        return detail + (" norm detached" if self.detach_norm else " exact norm grad")

    def prepare(self) -> None:
        if self.lora_A.is_meta:
            raise ValueError(
                "DoRA's magnitude is initialised to the row norms of the base weight, which is on the meta device "
                "(not materialized); patch the model after loading its weights, or use dora=False."
            )
        super().prepare()

    def reset_parameters(self) -> None:
        raise ValueError("reset_parameters: a DoRA adapter's magnitude depends on the base weight; unpatch and patch again.")

    def attach(self) -> None:
        """Initialise A and B (LoRA's rules), cache ‖W_i‖², and set the magnitude to the row norms."""
        if self.attached:
            return
        super().attach()
        with torch.no_grad():
            self._cache_weight_sq_norm()
            self.lora_magnitude_vector.copy_(self.row_norms())

    def _cache_weight_sq_norm(self) -> None:
        if self.is_4bit:
            weight = four_bit_weight(self.base_layer).dequantize(torch.float32)
        else:
            weight = self._weight().detach()
        self.weight_sq_norm.copy_(row_sq_norms(weight, self.weight_sq_norm.dtype))

    def _norm_compute_dtype(self) -> torch.dtype:
        if self.is_4bit:
            return self.base_layer.compute_dtype or torch.float32
        return self.base_layer.weight.dtype

    @torch.no_grad()
    def row_norms(self) -> Tensor:
        """``max(‖W_i + s·B_i A‖, eps)`` per output row, as the forward computes them without autocast."""
        dtype = self._norm_compute_dtype()
        weight = four_bit_weight(self.base_layer) if self.is_4bit else self._weight().detach().to(dtype)
        return dora_row_norm(weight, self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype),
                             self.weight_sq_norm.to(norm_dtype(dtype)), self.scale)

    def _run_op(self, x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, mask: Tensor | None) -> Tensor:
        sq_norm = self.weight_sq_norm.to(norm_dtype(x.dtype))
        if self.detach_norm:
            with torch.no_grad():
                norm = dora_row_norm(weight, lora_A.detach(), lora_B.detach(), sq_norm, self.scale)
        else:
            norm = dora_row_norm(weight, lora_A, lora_B, sq_norm, self.scale)
        g = self.lora_magnitude_vector.to(sq_norm.dtype) / norm
        return dora_linear(x, weight, bias, lora_A, lora_B, g, self.scale, self.dropout_p, mask)

    # ------------------------------------------------------------- adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {**super().adapter_state_dict(), "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        magnitude = state.get("lora_magnitude_vector")
        if magnitude is not None and magnitude.shape != self.lora_magnitude_vector.shape:
            raise ValueError(f"lora_magnitude_vector: saved shape {tuple(magnitude.shape)} != "
                             f"{tuple(self.lora_magnitude_vector.shape)}")
        super().load_adapter_state_dict(state)  # checks the key set, loads A and B (and a PiSSA residual)
        with torch.no_grad():
            copy_full_(self.lora_magnitude_vector, magnitude)
            if self.holds_residual:
                self._cache_weight_sq_norm()  # the residual base weight was re-derived

    def merged_weight(self) -> Tensor:
        """``W' = g ⊙ (W + s·BA)``, ``g = m / max(‖W + s·BA‖, eps)``, in float32 (float64 for a float64 base).

        Formed in full (out×in): this is for merging, not for training.
        """
        base = self.base_layer
        dtype = self.weight_sq_norm.dtype
        with torch.no_grad():
            if self.is_4bit:
                weight = four_bit_weight(base).dequantize(torch.float32).to(dtype)
            else:
                weight = self._weight().detach().to(dtype)
            full = weight + self.scale * (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))
            norm = torch.linalg.vector_norm(full, dim=1).clamp_min(NORM_EPS)
            return full.mul_((self.lora_magnitude_vector.detach().to(dtype) / norm)[:, None])

    def delta_weight(self) -> Tensor:
        """``W' - W``: what merging adds to the (dequantized) base weight."""
        if self.is_4bit:
            weight = four_bit_weight(self.base_layer).dequantize(torch.float32)
        else:
            weight = self._weight().detach()
        merged = self.merged_weight()
        return merged - weight.to(merged.dtype)

    def unpatched(self, merge: bool) -> nn.Module:
        """The plain layer to put back: with ``W' = g ⊙ (W + s·BA)`` written into it (``merge``) or not.

        Merging into a 4-bit base dequantizes, merges and re-quantizes (with a warning: that rounds).
        Dropping a PiSSA update restores the original weight, as for LoRA.
        """
        if not (merge and self.attached):
            return super().unpatched(merge)
        base = self.base_layer
        merged = self.merged_weight()
        if self.is_4bit:
            warnings.warn(
                "fastft.unpatch(merge=True) on a 4-bit base: the weight is dequantized, merged and re-quantized, "
                "which rounds the merged weight to 4 bits again.",
                stacklevel=3,
            )
            return requantize_like(base, merged.to(torch.float32))
        with torch.no_grad():
            weight = self._weight()
            weight.copy_(merged.to(weight.dtype))
        return base

    def _fold_update_into_base(self) -> None:
        """``W ← m ⊙ (W + s·BA) / ‖W + s·BA‖`` in place; :meth:`attach` then sets m to the new row norms (g = 1)."""
        weight = self._weight()
        weight.copy_(self.merged_weight().to(weight.device, weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dora=True, detach_norm={self.detach_norm}"
