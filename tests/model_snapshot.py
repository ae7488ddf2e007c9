"""A deep snapshot of a model, to assert that a failed call changed nothing.

What it records: every module's qualified name and class, every parameter and buffer (bit for bit, with its
dtype, device and requires_grad flag), every hook dictionary of every module, the instance attribute names of
each module (a patch state left behind shows up here), and the training flag.
"""
from __future__ import annotations

import torch
from torch import nn

_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _tensor(t: torch.Tensor):
    data = t.detach()
    if data.is_meta:
        return ("meta", tuple(data.shape), data.dtype)
    return (data.clone(), data.dtype, data.device, tuple(data.shape), t.requires_grad,
            None if not isinstance(t, nn.Parameter) or t.grad is None else t.grad.detach().clone())


def snapshot(model: nn.Module) -> dict:
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules[name] = (
            type(module),
            module.training,
            tuple(sorted(k for k in module.__dict__ if not k.startswith("_") or k == "_fastft_patch")),
            tuple((h, tuple(getattr(module, h, {}).keys())) for h in _HOOKS),
        )
    tensors = {f"p:{n}": _tensor(p) for n, p in model.named_parameters(remove_duplicate=False)}
    tensors.update({f"b:{n}": _tensor(b) for n, b in model.named_buffers(remove_duplicate=False)})
    return {"modules": modules, "tensors": tensors}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a.view(torch.uint8) if a.numel() and a.dtype != torch.bool else a,
                        b.view(torch.uint8) if b.numel() and b.dtype != torch.bool else b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Raise AssertionError naming the first difference between ``model`` now and ``before``."""
    after = snapshot(model)
    assert list(after["modules"]) == list(before["modules"]), (
        f"module tree changed: {sorted(set(after['modules']) ^ set(before['modules']))[:5]}"
    )
    for name, value in before["modules"].items():
        assert after["modules"][name] == value, f"module {name!r} changed: {value} -> {after['modules'][name]}"
    assert list(after["tensors"]) == list(before["tensors"]), (
        f"tensor names changed: {sorted(set(after['tensors']) ^ set(before['tensors']))[:5]}"
    )
    for name, value in before["tensors"].items():
        assert _same(after["tensors"][name], value), f"tensor {name} changed (value, dtype, device or requires_grad)"
