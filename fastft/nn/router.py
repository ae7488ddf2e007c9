"""``LoRARouter``: LoRA (or DoRA) on a MoE router that is not an ``nn.Linear`` (transformers 5's ``*TopKRouter``
classes: a module holding ``weight`` of experts × hidden, whose forward computes the router logits, the softmax,
the top-k choice and any bias correction).

The router's own forward runs unchanged, reading an adapted weight instead of its own (``torch.func.functional_call``)::

    LoRA:   W' = W + s·B A                                   (fastft.ops.lora_weight; W is experts × hidden: small)
    DoRA:   W' = diag(m / ‖W + s·B A‖) (W + s·B A)           (a norm per expert row; detached unless
                                                              LoRAConfig(dora_detach_norm=False))

This is what PEFT's ``ParamWrapper`` does for ``target_parameters=["gate.weight"]``, which is how PEFT adapts the
router of Mixtral- and Qwen2-MoE-style models under ``all-linear``: same parameters (``lora_A`` R×hidden,
``lora_B`` experts×R), same numbers, so ``export_peft`` / ``from_peft`` carry them over. PEFT has no DoRA for
parameters, so a DoRA router is fastft's own (fastft.save / load; export_peft refuses it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config import LoRAConfig
from ..ops.dora_row_norm import NORM_EPS
from ..ops.lora_weight import lora_weight
from .layer import FastFTLayer, ReadsThroughToBase


def check_router(module: nn.Module, name: str = "this module") -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"fastft LoRA on a MoE router: {name} ({type(module).__name__}) has no 2-D weight.")


class LoRARouter(ReadsThroughToBase, FastFTLayer):
    """LoRA / DoRA on a router module's ``weight``; see the module docstring."""

    op = "lora_weight"
    params = ("weight",)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, defer_attach: bool = False,
                 name: str = "this module"):
        super().__init__()
        check_router(base_layer, name)
        if config.dropout:
            raise ValueError(f"fastft LoRA on a MoE router ({name}) needs dropout=0 (PEFT's rule for parameter "
                             "targets): the router reads an adapted weight, there is no input to drop.")
        if config.holds_residual or not config.train_a:
            raise ValueError(f"fastft LoRA on a MoE router ({name}): PiSSA/CorDA/LoLDU and train_a=False are not supported there; "
                             "leave the router out of targets.")
        self.base_layer = base_layer
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.scale, self.init = config.r, config.alpha, config.scale, config.init
        self.dora, self.detach_norm = config.dora, config.dora_detach_norm
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=weight.device, dtype=dtype))
        if self.dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, device=weight.device, dtype=dtype))
        self.attached = False
        if not defer_attach:
            self.attach()

    @property
    def kind(self) -> str:
        return "dora-router" if self.dora else "lora-router"

    def report_detail(self) -> str:
        return f"r={self.r} s={self.scale:g} experts={self.out_features} adapted weight formed per call"

    def prepare(self) -> None:
        if self.dora and self.base_layer.weight.is_meta:
            raise ValueError("DoRA's router magnitude starts at the router weight's row norms, which is on the meta "
                             "device; patch after loading the weights, or use dora=False.")

    def attach(self) -> None:
        if self.attached:
            return
        self.attached = True
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if self.dora:
                self.lora_magnitude_vector.copy_(self._row_norm(self.base_layer.weight.to(self.lora_A.dtype)))

    @staticmethod
    def _row_norm(w: Tensor) -> Tensor:
        return torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS)

    def adapted_weight(self) -> Tensor:
        """W' of the module docstring, differentiable in the adapter parameters."""
        full = lora_weight(self.base_layer.weight, self.lora_A, self.lora_B, self.scale)
        if not self.dora:
            return full
        norm = self._row_norm(full.detach() if self.detach_norm else full)
        return full * (self.lora_magnitude_vector / norm).unsqueeze(1)

    def forward(self, *args, **kwargs):
        weight = self.adapted_weight().to(self.base_layer.weight.dtype)
        return functional_call(self.base_layer, {"weight": weight}, args, kwargs, strict=False)

    # ------------------------------------------------------------- adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters(recurse=False)}

    def unpatched(self, merge: bool) -> nn.Module:
        base = self.base_layer
        if merge and self.attached:
            with torch.no_grad():
                base.weight.copy_(self.adapted_weight().to(base.weight.dtype))
        return base

    def peft_tensors(self, param: str) -> tuple[Tensor, Tensor]:
        """PEFT's ParamWrapper layout for ``<router>.weight``: lora_A (r × hidden), lora_B (experts × r)."""
        if self.dora:
            raise ValueError("fastft.export_peft: DoRA on a MoE router has no PEFT format (PEFT refuses DoRA with "
                             "target_parameters). Keep the adapter with fastft.save / load, or merge it.")
        return self.lora_A.detach(), self.lora_B.detach()

    def load_peft_tensors(self, param: str, lora_A: Tensor, lora_B: Tensor) -> None:
        if self.dora or tuple(lora_A.shape) != tuple(self.lora_A.shape) or tuple(lora_B.shape) != tuple(self.lora_B.shape):
            raise ValueError(f"router weight with r={self.r}: PEFT's lora_A must be {tuple(self.lora_A.shape)} and "
                             f"lora_B {tuple(self.lora_B.shape)}, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        if not (bool(torch.isfinite(lora_A).all()) and bool(torch.isfinite(lora_B).all())):
            raise ValueError("router: the adapter file's factors hold NaN or inf")
        with torch.no_grad():
            self.lora_A.copy_(lora_A)
            self.lora_B.copy_(lora_B)

    def extra_repr(self) -> str:
        return f"experts={self.out_features}, r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dora={self.dora}"
