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
