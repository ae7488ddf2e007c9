"""``LoRAExperts``: LoRA on the fused 3-D expert weights of a transformers MoE block (Mixtral, Qwen3-MoE, gpt-oss,
DeepSeek, OLMoE, ...: the experts classes decorated with transformers' ``use_experts_implementation``).

For each adapted projection P of the experts (``gate_up_proj``, ``down_proj``; ``up_proj`` without a gate), with
frozen W_P (E×O×K, or E×K×O for ``is_transposed`` classes such as gpt-oss) and per-expert factors A_P (E×R×K),
B_P (E×O×R)::

    tokens sorted by expert; for expert e and its tokens x_e:
    h_e = apply_gate(x_e W_gu,eᵀ + b_gu,e + s·x_e A_gu,eᵀ B_gu,eᵀ)      (the model's own gate / activation)
    y_e = h_e W_d,eᵀ + b_d,e + s·h_e A_d,eᵀ B_d,eᵀ
    out[token] = Σ_(routed e) routing_weight · y_e

every product through :func:`fastft.ops.expert_lora` (one GEMM per expert segment, B·A never formed). The routing
(``top_k_index``, ``top_k_weights``) comes from the model's router, unchanged. The parameters are PEFT's
``target_parameters`` LoRA (``ParamWrapper``): ``fastft.export_peft`` / ``from_peft`` convert the layout.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import LoRAConfig
from ..ops.expert_lora import expert_lora
from ..ops.grouped_gemm import describe_path
from ..targets import is_fused_experts  # noqa: F401  (re-exported)
from .layer import FastFTLayer, ReadsThroughToBase

EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def check_experts(module: nn.Module, name: str = "this module") -> None:
    """Raise a clear error unless ``module`` is an experts class fastft's grouped forward reproduces."""
    kind = type(module).__name__
    needed = ("has_gate", "has_bias", "is_transposed", "num_experts")
    if not all(hasattr(module, a) for a in needed) or not hasattr(module, "_apply_gate"):
        raise TypeError(
            f"fastft LoRA on fused MoE experts supports transformers' standard experts classes (decorated with "
            f"use_experts_implementation); {name} is {kind}, which is not one. Leave it out of targets (e.g. list "
            "the attention projections), or use the model's per-expert nn.Linear variant."
        )
    if not hasattr(type(module).forward, "__wrapped__"):  # use_experts_implementation wraps the standard forward
        raise TypeError(
            f"fastft LoRA on fused MoE experts: {name} ({kind}) defines a forward of its own (e.g. a per-expert norm "
            "after the projections), which fastft's grouped forward does not reproduce. Leave it out of targets "
            "(e.g. list the attention projections)."
        )
    if getattr(module, "has_post_expert_norm", False) or getattr(module, "_is_expert_parallel", False):
        raise TypeError(f"fastft LoRA on experts: {name} ({kind}) uses a post-expert norm or expert parallelism, "
                        "which fastft's grouped forward does not reproduce.")
    if getattr(module, "is_concatenated", True) is False and getattr(module, "_apply_gate", None) is None:
        raise TypeError(f"fastft LoRA on experts: {name} ({kind}) has an interleaved gate without _apply_gate.")


def expert_shapes(module: nn.Module, param: str) -> tuple[int, int, int]:
    """(experts, in, out) of a 3-D expert projection."""
    weight = getattr(module, param)
    E, d1, d2 = weight.shape
    return (E, d1, d2) if module.is_transposed else (E, d2, d1)


class LoRAExperts(ReadsThroughToBase, FastFTLayer):
    """LoRA over the fused experts of one MoE block; see the module docstring.

    Args:
        base_layer: the transformers experts module (kept as the child ``base_layer``).
        config: a :class:`fastft.LoRAConfig` (r, alpha, rslora, init are used; dropout must be 0, as in PEFT).
        params: the projections to adapt (default: every 3-D projection the module has).
    """

    op = "expert_lora"
    kind = "lora-experts"
    supports_dora = False

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, params=None, defer_attach: bool = False,
                 name: str = "this module"):
        super().__init__()
        check_experts(base_layer, name)
        if config.dropout:
            raise ValueError(f"fastft LoRA on MoE experts ({name}) needs dropout=0 (PEFT's rule for expert LoRA): "
                             "dropout inside a per-expert product cannot be factored out of the grouped GEMM.")
        if config.dora != self.supports_dora:
            raise ValueError(f"{type(self).__name__} needs LoRAConfig(dora={self.supports_dora}) ({name}); "
                             "fastft.patch builds DoRAExperts for dora=True and LoRAExperts otherwise.")
        if config.holds_residual or not config.train_a:
            raise ValueError(f"fastft LoRA on MoE experts ({name}, {type(base_layer).__name__}): PiSSA/CorDA/LoLDU and "
                             "train_a=False are not supported on experts yet; leave the experts out of targets.")
        available = [p for p in EXPERT_PROJECTIONS if isinstance(getattr(base_layer, p, None), torch.Tensor)]
        self.params = tuple(params) if params else tuple(available)
        missing = [p for p in self.params if p not in available]
        if missing or not self.params:
            raise ValueError(f"{name}: no 3-D expert projection {missing or ''} (has {available}).")
        self.base_layer = base_layer
        self.r, self.alpha, self.scale, self.init = config.r, config.alpha, config.scale, config.init
        self.num_experts = base_layer.num_experts
        weight = getattr(base_layer, self.params[0])
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for p in self.params:
            E, fan_in, fan_out = expert_shapes(base_layer, p)
            self.register_parameter(f"lora_A_{p}", nn.Parameter(torch.empty(E, self.r, fan_in, device=weight.device, dtype=dtype)))
            self.register_parameter(f"lora_B_{p}", nn.Parameter(torch.zeros(E, fan_out, self.r, device=weight.device, dtype=dtype)))
        E, self.in_features, _ = expert_shapes(base_layer, self.params[0])
        self.out_features = self.in_features
        self.attached = False
        if not defer_attach:
            self.attach()

    def report_detail(self) -> str:
        weight = getattr(self.base_layer, self.params[0])
        E, fan_in, fan_out = expert_shapes(self.base_layer, self.params[0])
        path = describe_path(weight.device, weight.dtype, (fan_in, fan_out, self.r))
        return f"r={self.r} s={self.scale:g} experts={self.num_experts} params={','.join(self.params)} grouped: {path}"

    def attach(self) -> None:
        if self.attached:
            return
        self.attached = True
        with torch.no_grad():
            for p in self.params:
                A = getattr(self, f"lora_A_{p}")
                for e in range(A.shape[0]):  # PEFT's init of each expert's A (Kaiming-uniform, a=sqrt(5))
                    if self.init == "gaussian":
                        nn.init.normal_(A[e], std=1.0 / self.r)
                    else:
                        nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))

    # ---------------------------------------------------------------- forward
    def _adapted(self, x: Tensor, offsets: Tensor, weight: Tensor, param: str) -> Tensor:
        """The adapted projection's output for sorted rows x (before the bias)."""
        A, B = getattr(self, f"lora_A_{param}").to(x.dtype), getattr(self, f"lora_B_{param}").to(x.dtype)
        return expert_lora(x, offsets, weight, A, B, self.scale, transposed=self.base_layer.is_transposed)

    def _project(self, x: Tensor, offsets: Tensor, expert_ids: Tensor, param: str) -> Tensor:
        base = self.base_layer
        weight = getattr(base, param).to(x.dtype)
        if param in self.params:
            y = self._adapted(x, offsets, weight, param)
        else:
            E, fan_in, fan_out = expert_shapes(base, param)
            zeros_A = x.new_zeros(E, 1, fan_in)
            y = expert_lora(x, offsets, weight, zeros_A, x.new_zeros(E, fan_out, 1), 0.0, transposed=base.is_transposed)
        if base.has_bias:
            y = y + getattr(base, f"{param}_bias")[expert_ids].to(y.dtype)
        return y

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        base = self.base_layer
        num_top_k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        sorted_ids, perm = torch.sort(expert_ids, stable=True)
        x = hidden_states[perm // num_top_k]
        weights = top_k_weights.reshape(-1)[perm]
        keep = sorted_ids < self.num_experts  # an id == num_experts marks "no expert" (masked routing)
        counts = torch.bincount(sorted_ids[keep], minlength=self.num_experts)
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=x.device)
        offsets[1:] = torch.cumsum(counts, 0)
        ids = sorted_ids.clamp(max=self.num_experts - 1)
        if base.has_gate:
            h = base._apply_gate(self._project(x, offsets, ids, "gate_up_proj"))
        else:
            h = base.act_fn(self._project(x, offsets, ids, "up_proj"))
        y = self._project(h, offsets, ids, "down_proj")
        y = y * (weights * keep).unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, perm // num_top_k, y.to(out.dtype))

    # ------------------------------------------------------------- adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters(recurse=False)}

    def merged_weight(self, param: str) -> Tensor:
        """``W + s·B_e A_e`` for every expert in the stored layout of ``param`` and its dtype (for merging only)."""
        weight = getattr(self.base_layer, param)
        delta = self.delta_weight(param)
        return (weight.to(delta.dtype) + delta.to(weight.device)).to(weight.dtype)

    def delta_weight(self, param: str) -> Tensor:
        """``s·B_e A_e`` for every expert, in the stored layout of ``param`` (for merging only)."""
        A, B = getattr(self, f"lora_A_{param}").detach(), getattr(self, f"lora_B_{param}").detach()
        delta = self.scale * torch.bmm(B, A)  # E×out×in
        return delta.transpose(1, 2) if self.base_layer.is_transposed else delta

    def unpatched(self, merge: bool) -> nn.Module:
        base = self.base_layer
        if merge and self.attached:
            with torch.no_grad():
                for p in self.params:
                    getattr(base, p).copy_(self.merged_weight(p))
        return base

    def peft_tensors(self, param: str) -> tuple[Tensor, Tensor]:
        """PEFT's ParamWrapper layout: lora_A (E·r × in, expert-major), lora_B (out × r·E, rank-major)."""
        A, B = getattr(self, f"lora_A_{param}").detach(), getattr(self, f"lora_B_{param}").detach()
        E, r, fan_in = A.shape
        return A.reshape(E * r, fan_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)

    def load_peft_tensors(self, param: str, lora_A: Tensor, lora_B: Tensor) -> None:
        A, B = getattr(self, f"lora_A_{param}"), getattr(self, f"lora_B_{param}")
        E, r, fan_in = A.shape
        fan_out = B.shape[1]
        if tuple(lora_A.shape) != (E * r, fan_in) or tuple(lora_B.shape) != (fan_out, r * E):
            raise ValueError(
                f"{param} of {E} experts with r={r}: PEFT's lora_A must be {(E * r, fan_in)} and lora_B "
                f"{(fan_out, r * E)}, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)} (an adapter from another "
                "base model, or another rank)"
            )
        if not (bool(torch.isfinite(lora_A).all()) and bool(torch.isfinite(lora_B).all())):
            raise ValueError(f"{param}: the adapter file's expert factors hold NaN or inf")
        with torch.no_grad():
            A.copy_(lora_A.reshape(E, r, fan_in))
            B.copy_(lora_B.reshape(B.shape[1], r, E).permute(2, 0, 1))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, params={self.params}, r={self.r}, alpha={self.alpha}, scale={self.scale:g}"
