"""``QuantLinear``: a drop-in for ``nn.Linear`` with straight-through fake quantization (QAT). The attention
function that fake-quantizes keys and values inside attention is in :mod:`fastft.nn.qat_attention`.

    y = Q_a(x Q₄) · Q_w(W)ᵀ + b

``Q_w`` fake-quantizes the weight per output channel (or per group of ``group_size`` inputs), ``Q_a`` the
input activation per token (``fastft.ops.fake_quantize``: round to a ``bits``-bit grid and back; the
backward is the straight-through estimator, ``ste="identity"`` or ``"clipped"``). ``Q₄`` is the online
Hadamard rotation (R4, ``x ↦ hadamard_transform(x)``) that ``down_proj`` applies to its input when the
rotation folding has put ``Q₄`` into its weight; without ``a_bits`` the input is only rotated.

Under a LoRA adapter (``LoRAConfig`` and ``QATConfig`` in one ``fastft.patch`` call) the adapter's
``LoRALinear`` wraps this module and calls :meth:`QuantLinear.forward_with_update`, which quantizes the
merged weight: ``y = Q_a(x Q₄) · Q_w(W + s·BA)ᵀ + b``. The gradient reaches A and B through the STE, and
:func:`fastft.export_quantized` writes exactly ``Q_w(W + s·BA)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QATConfig
from ..distributed import copy_full_
from ..ops.fake_quantize import dequantize, fake_quantize, fake_quantize_with_mask, quantize
from ..ops.hadamard import hadamard_factorization, hadamard_transform
from ..ops.qat_linear import effective_weight, quant_weight_linear
from .layer import FastFTLayer, WrapsLinear


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized (arguments of ``fastft.ops.fake_quantize``)."""

    bits: int
    granularity: str
    group_size: int
    symmetric: bool
    clip_ratio: float
    ste: str

    def __call__(self, x: Tensor, rotate: bool = False) -> Tensor:
        return fake_quantize(
            x, self.bits, granularity=self.granularity, group_size=self.group_size, symmetric=self.symmetric,
            clip_ratio=self.clip_ratio, ste=self.ste, rotate=rotate,
        )

    def with_mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(fake-quantized x, the "not clamped" mask of the clipped STE), without autograd."""
        return fake_quantize_with_mask(
            x, self.bits, granularity=self.granularity, group_size=self.group_size, symmetric=self.symmetric,
            clip_ratio=self.clip_ratio,
        )

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return quantize(x, self.bits, self.granularity, self.group_size, self.symmetric, self.clip_ratio)

    def dequantize(self, codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
        return dequantize(codes, scale, zero, dtype)

    def describe(self) -> str:
        """e.g. ``4b per-channel asym`` or ``4b group128 sym clip0.9``."""
        grid = "sym" if self.symmetric else "asym"
        group = f"group{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
        clip = f" clip{self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""
        return f"{self.bits}b {group} {grid}{clip}"


def weight_spec(config: QATConfig) -> QuantSpec:
    granularity = "group" if config.w_granularity == "group" else "channel"
    return QuantSpec(config.w_bits, granularity, config.group_size, config.symmetric, config.clip_ratio, config.ste)


def activation_spec(config: QATConfig) -> QuantSpec | None:
    if config.a_bits is None:
        return None
    return QuantSpec(config.a_bits, config.a_granularity, config.group_size, config.symmetric, config.clip_ratio, config.ste)


def kv_spec(config: QATConfig) -> QuantSpec | None:
    if config.kv_bits is None:
        return None
    return QuantSpec(config.kv_bits, "token", config.group_size, config.symmetric, config.clip_ratio, config.ste)


def check_group_sizes(in_features: int, config: QATConfig, what: str) -> None:
    """Raise unless ``group_size`` divides ``in_features`` wherever a group granularity is used."""
    users = [name for name, gran in (("w_granularity", config.w_granularity), ("a_granularity", config.a_granularity)) if gran == "group"]
    if users and in_features % config.group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"QATConfig.group_size={config.group_size} does not divide the input width {in_features} of {what} "
            f"({' and '.join(users)}='group'); use a group size that divides every quantized layer's input "
            f"(e.g. {divisors or 'a divisor of ' + str(in_features)}) or 'channel' / 'token' granularity."
        )


class QuantLinear(WrapsLinear, FastFTLayer):
    """Fake-quantized linear layer; see the module docstring for the math.

    Args:
        base_layer: the ``nn.Linear`` (float weight) it replaces, kept as the child ``base_layer``.
        config: the :class:`fastft.QATConfig` (bits, granularities, grid, clipping, STE).
        rotate_input: apply the online Hadamard R4 to the input (the folding put its inverse in the weight).
    """

    op = "fake_quantize"
    kind = "qat"

    def __init__(self, base_layer: nn.Module, config: QATConfig, rotate_input: bool = False, name: str = "this layer"):
        super().__init__()
        if not isinstance(config, QATConfig):
            raise TypeError(f"QuantLinear needs a fastft.QATConfig, got {type(config).__name__}")
        if not isinstance(base_layer, nn.Linear) or not base_layer.weight.is_floating_point():
            raise TypeError(
                f"fastft QAT fake-quantizes float nn.Linear layers; {name} is {type(base_layer).__name__}"
                + (f" with a {base_layer.weight.dtype} weight" if isinstance(base_layer, nn.Linear) else "")
                + " (a bitsandbytes 4-bit base cannot be fake-quantized again: start QAT from the float model)."
            )
        check_group_sizes(base_layer.in_features, config, name)
        if rotate_input:
            try:
                hadamard_factorization(base_layer.in_features)
            except ValueError as err:
                raise ValueError(f"R4 rotates the input of {name}: {err}") from None
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.weight_quant = weight_spec(config)
        self.input_quant = activation_spec(config)
        self.rotate_input = rotate_input
        self.trains_weight = True  # False under a LoRA adapter (only the adapter trains)
        self.weight_on_grid = False  # True when the weight holds dequantized codes (fastft.load_quantized)

    @classmethod
    def from_linear(cls, layer: nn.Linear, config: QATConfig, rotate_input: bool = False) -> "QuantLinear":
        return cls(layer, config, rotate_input=rotate_input)

    def report_detail(self) -> str:
        parts = [f"W {self.weight_quant.describe()}", f"A {self.input_quant.describe()}" if self.input_quant else "A float"]
        if self.rotate_input:
            parts.append("R4 online")
        if self.weight_on_grid:
            parts.append("codes loaded")
        elif not self.trains_weight:
            parts.append("base frozen")
        return ", ".join(parts)

    # ---------------------------------------------------------------- forward
    def quantized_input(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            return self.input_quant(x, rotate=self.rotate_input)
        return hadamard_transform(x) if self.rotate_input else x

    def effective_weight(self, lora_A: Tensor | None = None, lora_B: Tensor | None = None, scale: float = 0.0) -> Tensor:
        """The weight before fake quantization: ``W``, or ``W + s·BA`` (in the adapter's dtype) under LoRA."""
        return effective_weight(self.base_layer.weight, lora_A, lora_B, scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_update(x)

    def forward_with_update(
        self, x: Tensor, lora_A: Tensor | None = None, lora_B: Tensor | None = None, scale: float = 0.0
    ) -> Tensor:
        """``Q_a(x Q₄) · Q_w(W + s·BA)ᵀ + b`` (``W`` alone without an update)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension is {x.shape[-1]} but this layer takes "
                f"{self.in_features} features (input shape {tuple(x.shape)})."
            )
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = self.quantized_input(x.to(dtype))
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.weight_on_grid and lora_A is None:  # loaded codes: used as they are
            return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        clipped = self.weight_quant.ste == "clipped"
        with torch.autocast(x.device.type, enabled=False):
            return quant_weight_linear(x, weight, bias, self.weight_quant, clipped, lora_A, lora_B, scale)

    # ------------------------------------------------------------ export / load
    def codes(self, lora_A: Tensor | None = None, lora_B: Tensor | None = None, scale: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """(integer codes, scale, zero) of the weight this layer computes with (``W + s·BA`` under LoRA)."""
        if self.weight_on_grid and lora_A is None:
            return self._loaded_codes
        return self.weight_quant.quantize(self.effective_weight(lora_A, lora_B, scale).detach())

    def load_codes(self, codes: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Hold ``dequantize(codes, scale, zero)`` as the weight, used as is (no re-quantization), frozen."""
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_(self.weight_quant.dequantize(codes, scale, zero, weight.dtype))
        for param in self.adapter_parameters().values():
            param.requires_grad_(False)
        self._loaded_codes = (codes, scale, zero)
        self.weight_on_grid = True
        self.trains_weight = False

    # ---------------------------------------------------------- the protocol
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The weight and bias when QAT trains them (alone); nothing under a LoRA adapter."""
        if not self.trains_weight:
            return {}
        params = {"weight": self.base_layer.weight}
        if self.base_layer.bias is not None:
            params["bias"] = self.base_layer.bias
        return params

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.adapter_parameters().items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`adapter_state_dict` output. Keys of an adapter on the same layer (``lora_A``...) are
        left to that adapter."""
        own = self.adapter_parameters()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"QAT state for this layer lacks {missing}")
        with torch.no_grad():
            for name, param in own.items():
                if state[name].shape != param.shape:
                    raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != {tuple(param.shape)}")
                copy_full_(param, state[name])

    def host_update(self, adapter: nn.Module) -> None:
        """Called when a LoRA adapter wraps this layer (``LoRALinear.rebase``); from then on only the adapter
        trains and the merged weight ``W + s·BA`` is what gets fake-quantized. Raises for adapters whose
        update cannot be merged into the weight every step."""
        if getattr(adapter, "supports_dora", False):
            raise ValueError(
                "LoRAConfig(dora=True) cannot be combined with QATConfig yet: under QAT the update is merged into the "
                "weight before it is fake-quantized, and DoRA's per-row magnitude would have to be folded in as well, "
                "which fastft does not do. Use LoRAConfig(dora=False) with QATConfig, or DoRA without QAT."
            )
        if getattr(adapter, "dropout_p", 0.0):
            raise ValueError(
                f"LoRAConfig.dropout={adapter.dropout_p} cannot be combined with QATConfig: under QAT the update is "
                "merged into the weight before it is fake-quantized (so export matches training), which leaves no "
                "separate low-rank input to drop out. Use dropout=0."
            )
        if getattr(adapter, "init", "default") in ("pissa", "corda", "loldu"):
            raise ValueError(
                f"LoRAConfig(init={adapter.init!r}) cannot be combined with QATConfig: the rotation folding rewrites the base "
                "weight that PiSSA splits. Use init='default' or 'gaussian'."
            )
        self.trains_weight = False

    def unpatched(self, merge: bool) -> nn.Module:
        """The plain layer. Its weight is still in the rotated basis: the QAT edits rotate it back."""
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.report_detail()}"
