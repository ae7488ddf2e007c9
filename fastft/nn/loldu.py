"""``LoLDULinear``: LoLDU (Shi et al. 2024), a LoRA whose factors come from an LDU split and stay frozen.

    W = P L D U  (LU with partial pivoting; L unit lower, D diagonal, U unit upper)
    A = U[:r]  (r×in, frozen),  B = (P L)[:, :r]  (out×r, frozen),  d0 = D[:r] / s  (r)
    y = x W_resᵀ + b + s · ((x Aᵀ) ⊙ d) Bᵀ,      W_res = W - s · B diag(d0) A

Only d (``lora_diag``, r values per layer) trains. At init d = d0, so the layer computes x Wᵀ + b exactly (up
to rounding). The op is ``lora_linear`` with its ``scale_vector`` input (d folded into B before the backend;
see :mod:`fastft.ops.lora`). Merging adds ``s · B diag(d) A``; unpatching without merge restores W.
The paper's extra trainable scalar is not a separate parameter here: it multiplies d, which d already spans.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import LoRAConfig
from ..distributed import copy_full_, full_tensor
from ..math.lora_inits import loldu_factors
from ..ops.lora import lora_linear
from .lora import LoRALinear


class LoLDULinear(LoRALinear):
    """LoLDU over a frozen linear layer (``LoRAConfig(init="loldu")``); see the module docstring."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, defer_attach: bool = False):
        if config.init != "loldu":
            raise ValueError(f"LoLDULinear needs LoRAConfig(init='loldu'), got init={config.init!r}")
        super().__init__(base_layer, config, defer_attach=True)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        self.train_a = False
        self.lora_diag = nn.Parameter(torch.ones(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype))
        if not defer_attach:
            self.attach()

    @property
    def kind(self) -> str:
        return "loldu"

    def report_detail(self) -> str:
        return f"r={self.r} s={self.scale:g} trains diag only (A, B frozen LDU factors)"

    def _initial_factors(self, weight: Tensor) -> tuple[Tensor, ...]:
        A, B, d = loldu_factors(weight, self.r, self.scale)
        with torch.no_grad():
            self.lora_diag.copy_(d)
        self.register_buffer("loldu_d0", d.clone(), persistent=False)
        return A, B, d

    def initial_delta(self) -> Tensor:
        return self.scale * (self.pissa_B0 * self.loldu_d0) @ self.pissa_A0

    def _run_op(self, x, weight, bias, lora_A, lora_B, mask):
        diag = self.lora_diag if self.lora_diag.dtype == x.dtype else self.lora_diag.to(x.dtype)
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scale, 0.0, None, scale_vector=diag)

    def forward(self, x: Tensor) -> Tensor:
        if getattr(type(self.base_layer), "forward_with_update", None) is not None:
            raise ValueError("LoLDU does not run over a QAT host layer.")
        return super().forward(x)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_diag": self.lora_diag}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """A and B are frozen and equal their initial values, so they are saved once (with d and d0): the
        load re-derives the residual from them, whatever LU the loading machine computes."""
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach(),
                "lora_diag": self.lora_diag.detach(), "loldu_d0": self.loldu_d0}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            raise ValueError(f"adapter state has keys {sorted(state)}, expected {sorted(expected)}")
        for name in expected:
            mine = self.adapter_state_dict()[name]
            if state[name].shape != mine.shape:
                raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != {tuple(mine.shape)}")
        with torch.no_grad():
            weight = self._weight()
            original = weight.to(self.lora_A.dtype) + self.initial_delta()
            for name in ("lora_A", "lora_B", "lora_diag"):
                copy_full_(getattr(self, name), state[name])
            self.pissa_A0.copy_(state["lora_A"])
            self.pissa_B0.copy_(state["lora_B"])
            self.loldu_d0.copy_(state["loldu_d0"])
            weight.copy_((original - self.initial_delta()).to(weight.dtype))

    def delta_weight(self) -> Tensor:
        """``s · B diag(d) A`` (out×in): what merging adds to the (residual) base weight."""
        return self.scale * (self.lora_B.detach() * self.lora_diag.detach()) @ self.lora_A.detach()

    def peft_factors(self) -> tuple[Tensor, Tensor, float]:
        """The equivalent PEFT LoRA on the original weight: ``s · B diag(d - d0) A``, rank r (A' = A,
        B' = B diag(d - d0))."""
        A, B = full_tensor(self.lora_A.detach()), full_tensor(self.lora_B.detach())
        return A, B * (full_tensor(self.lora_diag.detach()) - self.loldu_d0), 1

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale:g}, loldu"
