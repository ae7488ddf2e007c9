"""The argument checks of :func:`fastft.ops.linear_cross_entropy` (the fused loss op): every bad input is a
``ValueError`` / ``TypeError`` naming the argument and what to do, raised before any work starts.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

KINDS = ("ce", "dft", "talr")
REDUCTIONS = ("mean", "sum", "none")


def check_args(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], kind: str, reduction: str,
                token_weights: Optional[Tensor], label_smoothing: float, z_loss: float,
                logit_softcap: Optional[float], talr_min_weight: float, chunk_size: Optional[int]) -> None:
    if kind not in KINDS:
        raise ValueError(f"linear_cross_entropy: kind={kind!r}; choose one of {list(KINDS)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; choose one of {list(REDUCTIONS)}.")
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError("linear_cross_entropy: hidden must be a floating-point tensor (..., hidden_size).")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"linear_cross_entropy: weight must be the 2-D (vocab_size, hidden_size) lm_head weight, got shape "
            f"{tuple(getattr(weight, 'shape', ()))}."
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: hidden states have {hidden.shape[-1]} features but the weight is "
            f"{tuple(weight.shape)} (vocab_size × hidden_size): they do not belong together."
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other "
            "(inside a model under autocast, fastft casts both to the autocast dtype as lm_head would)."
        )
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor of token ids, got {getattr(labels, 'dtype', type(labels))}.")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels have shape {tuple(labels.shape)} but the hidden states {tuple(hidden.shape)} "
            f"need labels of shape {tuple(hidden.shape[:-1])} (one label per position)."
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.dtype != hidden.dtype):
        raise ValueError(
            f"linear_cross_entropy: bias must be ({weight.shape[0]},) of {hidden.dtype}, got "
            f"{tuple(bias.shape)} of {bias.dtype}."
        )
    if token_weights is not None and (
        not isinstance(token_weights, Tensor) or tuple(token_weights.shape) != tuple(labels.shape)
        or not token_weights.is_floating_point()
    ):
        raise ValueError(
            f"linear_cross_entropy: token_weights must be a float tensor of the labels' shape {tuple(labels.shape)}."
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing} must be in [0, 1].")
    if not z_loss >= 0.0:
        raise ValueError(f"linear_cross_entropy: z_loss={z_loss} must be >= 0 (a typical value is 1e-4).")
    if logit_softcap is not None and not logit_softcap > 0.0:
        raise ValueError(f"linear_cross_entropy: logit_softcap={logit_softcap} must be a positive number or None.")
    if not 0.0 <= talr_min_weight <= 1.0:
        raise ValueError(f"linear_cross_entropy: talr_min_weight={talr_min_weight} must be in [0, 1].")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size!r} must be a positive integer or None.")
    if kind == "talr" and labels.dim() != 2:
        raise ValueError(
            "linear_cross_entropy: kind='talr' needs 2-D labels (batch × sequence) with hidden states "
            "(batch × sequence × hidden): τ is a median over sequences, and flattened tokens do not say where a "
            f"sequence ends. Got labels of shape {tuple(labels.shape)}."
        )


def check_lowrank(hidden: Tensor, weight: Tensor, lowrank_hidden: Optional[Tensor],
                   lowrank_weight: Optional[Tensor]) -> None:
    if lowrank_hidden is None and lowrank_weight is None:
        return
    if lowrank_hidden is None or lowrank_weight is None:
        raise ValueError("linear_cross_entropy: pass both lowrank_hidden and lowrank_weight, or neither.")
    rank = lowrank_weight.shape[-1] if lowrank_weight.dim() == 2 else -1
    if (lowrank_weight.dim() != 2 or lowrank_weight.shape[0] != weight.shape[0]
            or tuple(lowrank_hidden.shape) != (*hidden.shape[:-1], rank)):
        raise ValueError(
            f"linear_cross_entropy: lowrank_weight must be (vocab_size={weight.shape[0]}, R) and lowrank_hidden "
            f"{tuple(hidden.shape[:-1])} + (R,); got {tuple(lowrank_weight.shape)} and {tuple(lowrank_hidden.shape)}."
        )
    if lowrank_hidden.dtype != hidden.dtype or lowrank_weight.dtype != hidden.dtype:
        raise TypeError(f"linear_cross_entropy: the low-rank operands must be {hidden.dtype} like hidden.")


def check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    if not torch.compiler.is_compiling() and detect_fake_mode(labels) is not None:
        return  # shapes without values (e.g. fastft.select_trainable reading the graph on fake tensors)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if torch.compiler.is_compiling():  # no host synchronisation (graph break) in a compiled graph: assert on device
        torch._assert_async(
            ~bad.any(),
            f"linear_cross_entropy: a label is outside the vocabulary [0, {vocab}) of the weight and is not "
            f"ignore_index={ignore_index}: the labels do not match this lm_head.",
        )
        return
    if bool(bad.any()):
        example = int(labels[bad][0])
        raise ValueError(
            f"linear_cross_entropy: label {example} is outside the vocabulary [0, {vocab}) of the weight "
            f"(vocab_size {vocab}) and is not ignore_index={ignore_index}: the labels do not match this lm_head."
        )


def check_num_items(num_items_in_batch: Any, labels: Tensor, ignore_index: int, device: torch.device) -> Optional[Tensor]:
    """``num_items_in_batch`` as a 0-d tensor on ``device``, checked: a finite count >= 0, and > 0 when these
    labels hold a target (it counts the targets of the whole batch, these included). A tensor on an
    accelerator is checked without a host sync (an asynchronous device assertion)."""
    if num_items_in_batch is None:
        return None
    what = "linear_cross_entropy: num_items_in_batch"
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex():
            raise ValueError(f"{what} must be a number or a 1-element real tensor, got shape {tuple(num_items_in_batch.shape)}.")
        if num_items_in_batch.dtype == torch.bool:
            raise TypeError(f"{what} is a bool tensor; give the count of target tokens (an int or a 1-element tensor).")
        num_items = num_items_in_batch.reshape(()).to(device)
    else:
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
            raise TypeError(f"{what}={num_items_in_batch!r}: give the count of target tokens (an int or a 1-element tensor).")
        num_items = torch.tensor(float(num_items_in_batch), device=device)
    has_target = (labels != ignore_index).any()
    ok = torch.isfinite(num_items) & (num_items >= 0) & ((num_items > 0) | ~has_target.to(device))
    if num_items.device.type == "cpu" and not torch.compiler.is_compiling() and detect_fake_mode() is None:
        if not bool(ok):
            raise ValueError(
                f"{what}={num_items.item()!r}: the number of target tokens in the whole batch must be finite, >= 0, "
                "and > 0 when these labels hold a target (a NaN, a negative count or 0 would give a NaN loss or "
                "silently divide by 1). Pass the count transformers' Trainer passes, or None to divide by this "
                "batch's own count."
            )
    else:
        torch._assert_async(ok, f"{what} must be finite, >= 0, and > 0 when the labels hold a target.")
    return num_items
