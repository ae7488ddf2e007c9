"""Loss terms that patched layers add to the training loss (an L0 penalty, a soft orthogonality term).

A layer states its term with ``FastFTLayer.regularization()`` (already weighted; None adds nothing).
:func:`regularization_loss` sums them over a model. A planner whose layers have a term puts a
:class:`RegularizationEdit` in its plan: while the model trains, a forward hook adds the sum to
``output.loss`` when the model computed one (a transformers ``ModelOutput`` with ``labels`` given), so the
transformers ``Trainer``, TRL and a loop that reads ``outputs.loss`` all train on it. A loop that computes
its own loss from the logits adds ``fastft.regularization_loss(model)`` itself. Several plans share one
hook; the last ``revert`` removes it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.layer import FastFTLayer
from .registry import Edit

HOOK_ATTR = "_fastft_regularization_hook"


def regularization_loss(model: nn.Module) -> Tensor | None:
    """The sum of every patched layer's ``regularization()`` term in ``model``; None when no layer has one."""
    terms = [term for module in model.modules() if isinstance(module, FastFTLayer)
             if (term := module.regularization()) is not None]
    if not terms:
        return None
    return torch.stack([t.float() for t in terms]).sum()


def _add_to_loss(model: nn.Module, args: Any, output: Any) -> Any:
    if not model.training:
        return output
    loss = getattr(output, "loss", None)
    if loss is None:
        return output
    term = regularization_loss(model)
    if term is not None:
        output.loss = loss + term.to(loss.dtype)
    return output


class RegularizationEdit(Edit):
    """Install (once per model) the forward hook that adds :func:`regularization_loss` to ``output.loss``."""

    def apply(self, model: nn.Module) -> None:
        handle, users = model.__dict__.get(HOOK_ATTR, (None, 0))
        if handle is None:
            handle = model.register_forward_hook(_add_to_loss)
        model.__dict__[HOOK_ATTR] = (handle, users + 1)

    def revert(self, model: nn.Module, merge: bool) -> None:
        handle, users = model.__dict__.get(HOOK_ATTR, (None, 0))
        if handle is None:
            return
        if users <= 1:
            handle.remove()
            model.__dict__.pop(HOOK_ATTR, None)
        else:
            model.__dict__[HOOK_ATTR] = (handle, users - 1)
