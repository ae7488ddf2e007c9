"""``DoRAExperts``: DoRA on the fused 3-D expert weights of a transformers MoE block (PEFT refuses DoRA there).

For each adapted projection P and expert e, with frozen W_P,e (O×K), factors A_P,e (R×K), B_P,e (O×R) and a
magnitude m_P,e (O), all trainable but W::

    W'_P,e = diag(g_P,e) (W_P,e + s·B_P,e A_P,e),    g = m / ‖W + s·BA‖   (a norm per output row of each expert)

The routed forward is :class:`fastft.nn.LoRAExperts`'s with every adapted product through
:func:`fastft.ops.expert_dora` (segment or grouped GEMMs over tokens sorted by expert; B·A never formed). The norms
come from :func:`fastft.ops.expert_dora.expert_row_norm` (‖W_e,i‖² cached once as the non-persistent buffer
``weight_sq_norm_<P>``, plus one E×O×K×R batched product a call): W + s·BA is formed only when merging. The norm is
detached by default (the DoRA paper, section 4.3; what fastft's linear DoRA and PEFT do);
``LoRAConfig(dora_detach_norm=False)`` lets the gradient flow through it. m starts at the norms, so DoRA equals the
base model at init (B = 0).

Parameters: ``lora_A_<P>`` (E×R×K), ``lora_B_<P>`` (E×O×R), ``lora_magnitude_<P>`` (E×O). fastft.save / load
keep them; PEFT has no format for DoRA on expert parameters, so ``fastft.export_peft`` refuses such a model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import LoRAConfig
from ..ops.dora_row_norm import NORM_EPS, norm_dtype
from ..ops.expert_dora import expert_dora, expert_row_norm
from .experts import LoRAExperts


class DoRAExperts(LoRAExperts):
    """DoRA over the fused experts of one MoE block; see the module docstring (arguments as LoRAExperts)."""

    op = "expert_dora"
    kind = "dora-experts"
    supports_dora = True

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, params=None, defer_attach: bool = False,
                 name: str = "this module"):
        super().__init__(base_layer, config, params=params, defer_attach=True, name=name)
        self.detach_norm = config.dora_detach_norm
        for p in self.params:
            B = getattr(self, f"lora_B_{p}")
            weight = getattr(base_layer, p)
            self.register_parameter(f"lora_magnitude_{p}", nn.Parameter(torch.ones(B.shape[:2], device=B.device,
                                                                                   dtype=B.dtype)))
            self.register_buffer(f"weight_sq_norm_{p}", torch.zeros(B.shape[:2], device=B.device,
                                                                     dtype=norm_dtype(weight.dtype)), persistent=False)
        if not defer_attach:
            self.attach()

    def report_detail(self) -> str:
        return super().report_detail() + (" norm detached" if self.detach_norm else " exact norm grad")

    def prepare(self) -> None:
        if any(getattr(self.base_layer, p).is_meta for p in self.params):
            raise ValueError("DoRA's magnitude starts at the row norms of the expert weights, which are on the meta "
                             "device; patch the model after loading its weights, or use dora=False.")

    def attach(self) -> None:
        """LoRA's init of A and B, then ‖W_e,i‖² cached and m set to the norms."""
        if self.attached:
            return
        super().attach()
        with torch.no_grad():
            for p in self.params:
                self._cache_weight_sq_norm(p)
                getattr(self, f"lora_magnitude_{p}").copy_(self.row_norms(p))

    def _cache_weight_sq_norm(self, p: str) -> None:
        weight = getattr(self.base_layer, p).detach()
        buf = getattr(self, f"weight_sq_norm_{p}")
        reduce_dim = 1 if self.base_layer.is_transposed else 2
        for e in range(weight.shape[0]):
            buf[e] = weight[e].to(buf.dtype).square().sum(reduce_dim - 1)

    def _norm(self, p: str, A: Tensor, B: Tensor) -> Tensor:
        return expert_row_norm(getattr(self.base_layer, p), self.base_layer.is_transposed, A, B,
                               getattr(self, f"weight_sq_norm_{p}"), self.scale)

    @torch.no_grad()
    def row_norms(self, p: str) -> Tensor:
        """``max(‖W_e,i + s·B_e,i A_e‖, eps)`` for every expert and output row (E×O)."""
        return self._norm(p, getattr(self, f"lora_A_{p}").detach(), getattr(self, f"lora_B_{p}").detach())

    def _adapted(self, x: Tensor, offsets: Tensor, weight: Tensor, param: str) -> Tensor:
        A, B = getattr(self, f"lora_A_{param}"), getattr(self, f"lora_B_{param}")
        if self.detach_norm:
            with torch.no_grad():
                norm = self._norm(param, A.detach(), B.detach())
        else:
            norm = self._norm(param, A, B)
        g = getattr(self, f"lora_magnitude_{param}").to(norm.dtype) / norm
        return expert_dora(x, offsets, weight, A.to(x.dtype), B.to(x.dtype), g, self.scale,
                           transposed=self.base_layer.is_transposed)

    def merged_weight(self, param: str) -> Tensor:
        """``g ⊙ (W_e + s·B_e A_e)`` for every expert, in the stored layout and dtype (formed in full: merging)."""
        weight = getattr(self.base_layer, param)
        dtype = getattr(self, f"weight_sq_norm_{param}").dtype
        A = getattr(self, f"lora_A_{param}").detach().to(dtype)
        B = getattr(self, f"lora_B_{param}").detach().to(dtype)
        w = weight.detach().to(dtype)
        w = w.transpose(1, 2) if self.base_layer.is_transposed else w  # E×O×K
        full = w + self.scale * torch.bmm(B, A)
        norm = torch.linalg.vector_norm(full, dim=2).clamp_min(NORM_EPS)
        full = full * (getattr(self, f"lora_magnitude_{param}").detach().to(dtype) / norm).unsqueeze(2)
        full = full.transpose(1, 2) if self.base_layer.is_transposed else full
        return full.to(weight.dtype)

    def peft_tensors(self, param: str):
        raise ValueError("fastft.export_peft: DoRA on MoE expert parameters has no PEFT format (PEFT refuses DoRA "
                         "with target_parameters). Keep the adapter with fastft.save / fastft.load, or merge it "
                         "(fastft.unpatch(model, merge=True)) and save the model.")

    def load_peft_tensors(self, param: str, lora_A: Tensor, lora_B: Tensor) -> None:
        self.peft_tensors(param)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dora=True, detach_norm={self.detach_norm}"
