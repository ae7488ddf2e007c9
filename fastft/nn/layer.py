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

from torch import Tensor, nn


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
        raise NotImplementedError(f"{type(self).__name__}.adapter_state_dict")

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.load_adapter_state_dict")

    def regularization(self) -> Tensor | None:
        """The term this layer adds to the training loss, already weighted; None adds nothing."""
        return None

    def unpatched(self, merge: bool) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.unpatched")
