"""``FastFTLayer``: the contract every drop-in module of ``fastft.nn`` implements.

``fastft.patch`` swaps a model's layer for a ``FastFTLayer`` that wraps it (``base_layer``), and everything
above the modules (planners, patch, save / load, export, policies, integrations) talks to the module only
through these methods — no name matching, no ``getattr`` probing.

==========================  ===================================================================
``base_layer``              the wrapped layer (``nn.Linear``, bitsandbytes ``Linear4bit``, or another
                            fastft module hosted underneath, e.g. QAT's ``QuantLinear`` under LoRA)
``kind``                    short name of the method in the patch report (``lora``, ``dora``, ...)
``report_detail()``         one line for the patch report (rank, scale, slice, ...)
``attach()``                second phase of building: initialisation that reads or rewrites the base
                            layer (PiSSA's residual, DoRA's magnitude); ``unpatched(merge=False)``
                            undoes it
``adapter_parameters()``    the trainable tensors, by local name
``adapter_state_dict()``    what ``fastft.save`` stores for the module
``load_adapter_state_dict`` the inverse, validating names and shapes before copying anything
``unpatched(merge)``        the layer to put back: ``base_layer`` with the update folded in
                            (``merge=True``) or untouched (``merge=False``)
``regularization()``        a term this layer adds to the training loss (already weighted: an L0
                            penalty, a soft orthogonality term), or None (the default); see
                            ``fastft.plans.regularization``
==========================  ===================================================================
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bnb import four_bit_weight
from ..targets import out_in_weight


class FastFTLayer(nn.Module):
    """Base class of fastft's drop-in modules; see the module docstring for the contract."""

    base_layer: nn.Module

    @property
    def kind(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must name its method (the kind property)")

    def report_detail(self) -> str:
        return ""

    def attach(self) -> None:
        """Initialisation that touches the base layer; nothing by default."""

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError(f"{type(self).__name__}.adapter_parameters")

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter parameters, detached (the default: a module that stores nothing else)."""
        return {n: p.detach() for n, p in self.adapter_parameters().items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the adapter parameters after checking every name and shape (nothing is copied
        when one is wrong)."""
        params = self.adapter_parameters()
        if set(state) != set(params):
            raise ValueError(f"{type(self).__name__}: adapter state has keys {sorted(state)}, expected {sorted(params)}")
        for n, p in params.items():
            if state[n].shape != p.shape:
                raise ValueError(f"{type(self).__name__}: {n}: saved shape {tuple(state[n].shape)} != {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def regularization(self) -> Tensor | None:
        """The term this layer adds to the training loss, already weighted; None adds nothing."""
        return None

    def unpatched(self, merge: bool) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.unpatched")


class WrapsLinear:
    """``weight`` and ``bias`` read through to ``base_layer``: what model code reads of the linear layer a module
    replaced (``proj.weight.dtype``, ``proj.bias is None``), the wrapped layer's own parameters."""

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


class ReadsThroughToBase:
    """Attribute reads a wrapper cannot answer go to its ``base_layer``: what model code reads of the wrapped
    module (``num_experts``, ``act_fn``, ``config``, ...). Names starting ``lora_`` never do (a missing adapter
    tensor is an error, not the base's attribute). List it before ``FastFTLayer`` among the bases."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" not in modules or name.startswith("lora_"):
                raise
            return getattr(modules["base_layer"], name)


class LinearOperands:
    """The forward preamble of a module over a linear-like base (``nn.Linear``, transformers ``Conv1D``,
    bitsandbytes ``Linear4bit``), which sets ``base_layer``, ``in_features`` and ``is_4bit``.

    The compute dtype is the 4-bit layer's ``compute_dtype``, else autocast's, else the input's. Casts happen only
    where a dtype differs: a no-op ``.to()`` still costs a dispatcher round trip per call.
    """

    def _weight(self) -> Tensor:
        """The base weight as out×in (a transposed view for a Conv1D base)."""
        return out_in_weight(self.base_layer)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if self.is_4bit and self.base_layer.compute_dtype is not None:
            return self.base_layer.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _linear_operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, torch.dtype]:
        """(x, weight, bias, input dtype): x checked against ``in_features`` and cast to the compute dtype; the
        base weight (out×in, or the packed 4-bit weight) and bias in that dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension is {x.shape[-1]} but this layer takes "
                f"{self.in_features} features (input shape {tuple(x.shape)})."
            )
        input_dtype = x.dtype
        dtype = self._compute_dtype(x)
        if input_dtype != dtype:
            x = x.to(dtype)
        base = self.base_layer  # read once: each nn.Module attribute read is a Python __getattr__ (host time)
        if self.is_4bit:
            weight = four_bit_weight(base)
        else:
            weight = self._weight()
            if weight.dtype != dtype:
                weight = weight.to(dtype)
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return x, weight, bias, input_dtype
