"""``SelectiveLoRALinear``: a LoRA block behind a learned indicator gate (Selective LoRA, TAPS-style).

    y = x Wᵀ + b + I(σ ≥ τ) · s · (x Aᵀ) Bᵀ,        ∂I/∂σ := 1 (straight-through)
    loss term: l1 · |σ|                               (``regularization()``)

While the gate is open the block runs the ``lora_linear`` op with the gate as its ``scale_vector``
(``d = g·1_r``, g = I(σ ≥ τ) with the straight-through trick, value exactly 1), so σ's gradient is the sum of
the op's ``dd`` (``Σ_tokens (x Aᵀ) ⊙ (g_y B)`` summed over the rank). While it is closed the block calls the
base layer alone: no low-rank product, no gradient to A, B or σ from the loss (only the L1 term moves σ,
further down), so a closed block stays closed. Reading the gate costs one device-to-host read of σ per
layer after each optimizer step (cached by σ's version counter), none in eval.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SelectiveLoRAConfig
from ..ops.lora import lora_linear
from .lora import LoRALinear


class SelectiveLoRALinear(LoRALinear):
    """A gated LoRA block (``SelectiveLoRAConfig``); see the module docstring."""

    def __init__(self, base_layer: nn.Module, config: SelectiveLoRAConfig, defer_attach: bool = False):
        if not isinstance(config, SelectiveLoRAConfig):
            raise TypeError(f"SelectiveLoRALinear needs a fastft.SelectiveLoRAConfig, got {type(config).__name__}")
        super().__init__(base_layer, config, defer_attach=defer_attach)
        self.threshold, self.l1 = float(config.threshold), float(config.l1)
        device = self.lora_A.device
        self.lora_gate_score = nn.Parameter(torch.full((), float(config.score_init), device=device,
                                                       dtype=torch.float32))
        self._gate_cache = (None, True)  # (σ's version when read, active)

    @property
    def kind(self) -> str:
        return "selective_lora"

    @property
    def active(self) -> bool:
        """Whether the gate is open: ``σ ≥ τ`` (read once per change of σ)."""
        score = self.lora_gate_score
        version = (score._version, score.data_ptr())
        if self._gate_cache[0] != version:
            self._gate_cache = (version, bool(score.detach() >= self.threshold))
        return self._gate_cache[1]

    def report_detail(self) -> str:
        return super().report_detail() + f" gate σ={float(self.lora_gate_score.detach()):g} τ={self.threshold:g}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base_layer(x)  # the block is off: the base layer alone, no low-rank product
        return super().forward(x)

    def _run_op(self, x, weight, bias, lora_A, lora_B, mask):
        score = self.lora_gate_score
        gate = (score - score.detach() + 1.0).to(x.dtype)  # value 1 (the gate is open), ∂gate/∂σ = 1
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scale, self.dropout_p, mask,
                           scale_vector=gate.expand(self.r))

    def regularization(self) -> Tensor | None:
        return self.l1 * self.lora_gate_score.abs() if self.l1 else None

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "lora_gate_score": self.lora_gate_score}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {**super().adapter_state_dict(), "lora_gate_score": self.lora_gate_score.detach()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        score = state.get("lora_gate_score")
        if score is not None and score.shape != self.lora_gate_score.shape:
            raise ValueError(f"lora_gate_score: saved shape {tuple(score.shape)} != () (a scalar)")
        super().load_adapter_state_dict(state)  # checks the key set (the score included), loads A and B
        with torch.no_grad():
            self.lora_gate_score.copy_(score)

    def delta_weight(self) -> Tensor:
        """``I(σ ≥ τ) · s·BA``: zero for a closed block."""
        delta = super().delta_weight()
        return delta if self.active else torch.zeros_like(delta)

    def peft_factors(self) -> tuple[Tensor, Tensor, float]:
        """A closed block exports as B = 0 (PEFT LoRA has no gates)."""
        A, B, multiplier = super().peft_factors()
        return (A, B, multiplier) if self.active else (A, torch.zeros_like(B), multiplier)


def selective_lora_active(model: nn.Module) -> tuple[int, int]:
    """(open gates, gated blocks) over the :class:`SelectiveLoRALinear` modules of ``model``."""
    blocks = [m for m in model.modules() if isinstance(m, SelectiveLoRALinear)]
    return sum(m.active for m in blocks), len(blocks)
