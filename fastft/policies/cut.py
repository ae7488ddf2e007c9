"""Where the backward stops: a forward pre-hook that detaches the input of the lowest trainable block.

When nothing below decoder layer i trains, the gradient has no reason to go below layer i's input. Autograd
already stops there when every tensor below is frozen, but two things make it go further:

- transformers' ``enable_input_require_grads`` (which ``gradient_checkpointing_enable`` switches on for
  every language model) makes the embedding output require grad, so the backward runs through every
  layer down to it — the activation gradients of all the frozen layers, for nothing;
- reentrant checkpointing (``use_reentrant=True``) is the opposite trap: a checkpointed layer whose
  inputs do not require grad returns an output that does not either, so the gradients of the trainable
  parameters *inside* it silently stay ``None`` (or ``backward`` fails with "does not require grad").

:class:`BackwardCut` handles both on the lowest trainable block: its hidden-state input enters detached
(nothing below is backpropagated), and, when that block is checkpointed reentrantly in training, as a
fresh leaf that requires grad (so the checkpoint backpropagates into the block; the price is the
gradient of that block's input, which the FLOP report counts).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden states a block is called with: its first positional tensor, or ``hidden_states=``."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, Tensor) else None


def replace_first_tensor(args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], Tensor):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def checkpointing_of(module: nn.Module) -> str:
    """``"none"``, ``"non-reentrant"`` or ``"reentrant"``: how transformers checkpoints this block.

    A checkpoint function that is not a ``functools.partial`` of ``torch.utils.checkpoint.checkpoint``
    (whose ``use_reentrant`` can be read) counts as reentrant: the cut then keeps gradients flowing.
    """
    if not getattr(module, "gradient_checkpointing", False):
        return "none"
    func = getattr(module, "_gradient_checkpointing_func", None)
    if isinstance(func, functools.partial) and "use_reentrant" in func.keywords:
        return "reentrant" if func.keywords["use_reentrant"] else "non-reentrant"
    return "reentrant"  # torch.utils.checkpoint's default when use_reentrant is not given


class BackwardCut:
    """Forward pre-hook: the block's hidden-state input enters detached (a leaf requiring grad under reentrant
    checkpointing in training); see the module docstring."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def needs_leaf(self) -> bool:
        return self.module.training and checkpointing_of(self.module) == "reentrant"

    def __call__(self, module, args, kwargs):
        hidden = first_tensor(args, kwargs)
        if hidden is None or not torch.is_grad_enabled():
            return None
        leaf = self.needs_leaf()
        if not hidden.requires_grad and not leaf:
            return None
        cut = hidden.detach()
        if leaf:
            cut.requires_grad_(True)
        return replace_first_tensor(args, kwargs, cut)

    def remove(self) -> None:
        self.handle.remove()
