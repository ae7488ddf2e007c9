"""The adapted-weight op: ``W' = W + s·B A`` formed in full, for small matrices a module reads as a parameter.

Used for MoE routers (``fastft.nn.LoRARouter``): a router's forward (softmax, top-k, grouping, bias
corrections) is model code that reads its ``weight``; the router's weight is small (experts × hidden), so the
adapted weight is formed once per call and handed to that code, as PEFT's ``ParamWrapper`` does. For W (O×K),
trainable A (R×K), B (O×R)::

    forward:   W' = W + s·B A                          (one O×R×K product)
    backward:  dA = s·Bᵀ dW',    dB = s·dW' Aᵀ         (for dW' = ∂L/∂W'; W gets no gradient)

Saved for backward: A and B (the caller's parameters); never W' (the caller may modify it in place).
FLOPs: ``2·O·R·K`` forward, ``4·O·R·K`` backward (:func:`lora_weight_flops`).
The PyTorch implementation here is the reference and runs on every device (cuBLAS on CUDA); no Triton kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, register_op


def lora_weight_forward_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    return torch.addmm(weight.to(lora_A.dtype), lora_B, lora_A, alpha=scale)


def lora_weight_backward_reference(grad: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, need_dA: bool,
                                   need_dB: bool) -> tuple[Tensor, Tensor]:
    grad = grad.to(lora_A.dtype)
    dA = (lora_B.t() @ grad).mul_(scale) if need_dA else grad.new_empty(0)
    dB = (grad @ lora_A.t()).mul_(scale) if need_dB else grad.new_empty(0)
    return dA, dB


register_op("lora_weight", {
    "torch": {"forward": lora_weight_forward_reference, "backward": lora_weight_backward_reference},
})


@torch.library.custom_op("fastft::lora_weight", mutates_args=())
def _lora_weight_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    return implementation("lora_weight", "forward", weight.device)(weight, lora_A, lora_B, scale)


@_lora_weight_op.register_fake
def _(weight, lora_A, lora_B, scale):
    return lora_A.new_empty(weight.shape)


@torch.library.custom_op("fastft::lora_weight_backward", mutates_args=())
def _lora_weight_backward_op(grad: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, need_dA: bool,
                             need_dB: bool) -> tuple[Tensor, Tensor]:
    return implementation("lora_weight", "backward", grad.device)(grad, lora_A, lora_B, scale, need_dA, need_dB)


@_lora_weight_backward_op.register_fake
def _(grad, lora_A, lora_B, scale, need_dA, need_dB):
    return (lora_A.new_empty(lora_A.shape) if need_dA else grad.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else grad.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, lora_A, lora_B, scale = inputs
    ctx.save_for_backward(lora_A, lora_B)
    ctx.meta = (scale, ctx.needs_input_grad[1], ctx.needs_input_grad[2])


def _backward(ctx, grad):
    lora_A, lora_B = ctx.saved_tensors
    scale, need_dA, need_dB = ctx.meta
    dA, dB = _lora_weight_backward_op(grad.contiguous(), lora_A, lora_B, scale, need_dA, need_dB)
    return None, (dA if need_dA else None), (dB if need_dB else None), None


_lora_weight_op.register_autograd(_backward, setup_context=_setup_context)


def lora_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``W + scale · B A`` in the factors' dtype (module docstring); W (O×K) is frozen."""
    if weight.dim() != 2 or lora_A.shape[1] != weight.shape[1] or lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(f"lora_weight: W {tuple(weight.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} "
                         "must be O×K, R×K, O×R")
    return _lora_weight_op(weight, lora_A, lora_B, float(scale))


def lora_weight_flops(O: int, K: int, R: int, backward: bool = True) -> int:
    return 2 * O * R * K * (3 if backward else 1)
