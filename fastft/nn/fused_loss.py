"""The run-time side of the fused loss: the causal-LM forward that ``LossConfig`` installs on a model instance.

The planner (``fastft/plans/loss.py``) checks the model and installs :func:`causal_lm_forward` of the
model's class as the instance's ``forward`` with a :class:`FusedLossSettings` beside it; what follows runs
at every call. The forward behaves exactly like the class's forward except when ``labels`` are given:

  1. the decoder (``model.<base_model_prefix>``) runs with the same arguments;
  2. its last hidden states are sliced by ``logits_to_keep`` as transformers does;
  3. the labels are shifted as ``transformers.loss.loss_utils.ForCausalLMLoss`` does — padded on the right
     with ``ignore_index`` and shifted left by one — or ``shift_labels`` is used as given;
  4. the loss is :func:`fastft.ops.linear_cross_entropy` over the hidden states and lm_head's weight (and
     bias), with the model's final logit softcap (Gemma 2's ``final_logit_softcapping``) and
     ``num_items_in_batch`` (the "mean" divisor under gradient accumulation; transformers' Trainer passes
     it because this forward takes ``**kwargs``);
  5. logits are computed only when asked: ``return_logits=True``, or by default in eval mode
     (``not model.training``); then lm_head runs on the kept positions (softcapped like the model does),
     while the loss still comes from the fused op. In train mode ``outputs.logits`` is None.

Without labels the class's forward runs untouched (generation, inference). A fastft LoRA lm_head is
computed through: base weight plus the low-rank term ``s·dropout(h)Aᵀ · Bᵀ``, still without logits.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..bnb import is_linear4bit
from ..config import LossConfig
from ..ops.linear_cross_entropy import linear_cross_entropy
from .lora import LoRALinear

SETTINGS_ATTR = "_fastft_fused_loss"


class Missing:
    """'No instance forward was there' — one object that survives copy.deepcopy of a patched model."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


MISSING = Missing()


@dataclass
class FusedLossSettings:
    """What the installed forward needs; kept in the model's ``__dict__`` so a deep copy carries it."""

    config: LossConfig
    head_name: str
    softcap: Optional[float]
    previous_forward: Any  # an instance-level forward that was there before (e.g. accelerate's hooks), or None
    signature: Any = None  # the class forward's inspect.Signature, read once here (not per call, not under compile)


def _fsdp_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is its own FSDP2 unit (``fully_shard(module)``): its parameters are whole only inside
    a forward that FSDP knows about."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _module_class(module: nn.Module) -> type:
    """The module's class, seen through FSDP2's ``FSDP<Class>`` subclass that ``fully_shard`` installs."""
    cls = type(module)
    if _fsdp_sharded(module):
        from torch.distributed.fsdp import FSDPModule

        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def check_head(module: nn.Module, name: str) -> None:
    """lm_head must be a plain ``nn.Linear`` with a float weight, or a fastft ``LoRALinear`` over one (the op
    then adds the low-rank term): the op reads the weights directly. Either may be an FSDP2 unit."""
    if _module_class(module) is nn.Linear and module.weight.is_floating_point():
        return
    if _module_class(module) is LoRALinear and not module.is_4bit:
        return
    if is_linear4bit(module) or getattr(module, "is_4bit", False) or (
        isinstance(module, nn.Linear) and not module.weight.is_floating_point()
    ):
        raise ValueError(
            f"fastft LossConfig: '{name}' is a quantized {type(module).__name__}; the fused loss reads lm_head's "
            "weight directly and does not support a 4-bit/8-bit lm_head. Keep lm_head unquantized "
            "(e.g. BitsAndBytesConfig(llm_int8_skip_modules=['lm_head'])) or drop LossConfig."
        )
    if hasattr(module, "base_layer") or type(module).__module__.startswith(("fastft.", "peft.")):
        raise ValueError(
            f"fastft LossConfig: '{name}' would be a {type(module).__name__} adapter layer. The fused loss computes "
            "through a plain nn.Linear or a fastft LoRA lm_head only, so this adapter would never train. Leave "
            "lm_head out of the adapter's targets (e.g. targets='all-linear'), use LoRA there, or drop LossConfig."
        )
    raise ValueError(
        f"fastft LossConfig: '{name}' is a {type(module).__name__}; the fused loss supports an lm_head that is "
        "a plain torch.nn.Linear."
    )


def refuse_foreign_fused_head(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a LossConfig model: TRL's trainers (SFTTrainer, ...) replace the instance forward with
    their own fused LM head and call it with ``fused_lm_head=True``; that path reads lm_head's weight itself and
    would silently train with TRL's loss instead of the configured one. Refuse it clearly."""
    if kwargs.get("fused_lm_head"):
        raise ValueError(
            "fastft LossConfig: this call asks for TRL's fused LM head (fused_lm_head=True, as trl.SFTTrainer does), "
            "which computes its own loss from lm_head's weight and would bypass fastft's fused loss "
            f"({module.__dict__[SETTINGS_ATTR].config!r}). Train with fastft.integrations.FastFTSFTTrainer (an "
            "SFTTrainer whose loss is the model's, i.e. fastft's), or drop LossConfig to use TRL's own loss."
        )
    return None


@functools.lru_cache(maxsize=None)
def class_signature(model_class: type) -> inspect.Signature:
    return inspect.signature(model_class.forward)


@functools.lru_cache(maxsize=None)
def causal_lm_forward(model_class: type):
    """A forward with the class forward's signature plus ``return_logits`` (what Trainer inspects)."""
    signature = class_signature(model_class)
    params = list(signature.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, extra)

    def forward(self, *args, **kwargs):
        return fused_causal_lm_forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=params)
    forward.__doc__ = fused_causal_lm_forward.__doc__
    forward.__name__ = forward.__qualname__ = "forward"
    return forward


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # older transformers: an int or a 1-D index tensor
        if isinstance(logits_to_keep, int):
            return hidden[:, slice(-logits_to_keep, None), :]
        return hidden[:, logits_to_keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def fused_causal_lm_forward(model: nn.Module, *args, **kwargs):
    """The class's forward, except that with ``labels`` the loss is fused and logits are optional.

    ``return_logits``: None (default) returns logits in eval mode only; True / False force it.
    """
    settings: FusedLossSettings = model.__dict__[SETTINGS_ATTR]
    return_logits = kwargs.pop("return_logits", None)

    def original(*args, **kwargs):  # the forward without the fused loss (bound only when used: torch.compile)
        if settings.previous_forward is not None:
            return settings.previous_forward(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)

    signature = settings.signature or class_signature(type(model))
    try:
        bound = signature.bind(model, *args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # let the model raise its own error about the arguments
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    var_kw = next((p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD), None)
    extra = dict(arguments.pop(var_kw, {})) if var_kw else {}
    labels = arguments.pop("labels", None)
    if labels is None:
        return original(*args, **kwargs)

    cfg = settings.config
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    shift_labels = extra.pop("shift_labels", None)
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)

    decoder = getattr(model, model.base_model_prefix)
    outputs = decoder(**arguments, **extra)
    hidden = _slice_to_keep(outputs.last_hidden_state, logits_to_keep)

    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=cfg.ignore_index)
        shift_labels = labels[..., 1:]
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"fastft fused loss: labels give targets of shape {tuple(shift_labels.shape)} (after the shift) but "
            f"the model kept hidden states for positions of shape {tuple(hidden.shape[:-1])} "
            f"(input of shape {tuple(outputs.last_hidden_state.shape[:-1])}, logits_to_keep={logits_to_keep!r}); "
            "pass labels of the same shape as input_ids (or shift_labels matching the kept positions)."
        )
    head = model.get_submodule(settings.head_name)
    check_head(head, settings.head_name)
    want_logits = (not model.training) if return_logits is None else bool(return_logits)
    run_head = _fsdp_head_method(head) if _fsdp_sharded(head) else functools.partial(fused_head, head)
    loss, logits = run_head(hidden, shift_labels.to(hidden.device), num_items_in_batch, cfg, settings.softcap,
                            want_logits)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = set(CausalLMOutputWithPast.__dataclass_fields__)
    carried = {key: value for key, value in outputs.items() if key in fields and key not in ("loss", "logits")}
    result = CausalLMOutputWithPast(loss=loss, logits=logits, **carried)
    return result if return_dict else result.to_tuple()


def fused_head(head: nn.Module, hidden: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch: Any,
               cfg: LossConfig, softcap: Optional[float], want_logits: bool):
    """lm_head's part of the forward: (the fused loss, the logits or None)."""
    hidden, weight, bias, lowrank_hidden, lowrank_weight = _head_operands(head, hidden)
    loss = linear_cross_entropy(
        hidden, weight, shift_labels, bias, kind=cfg.kind, reduction="mean",
        ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
        logit_softcap=softcap, talr_min_weight=cfg.talr_min_weight, chunk_size=cfg.chunk_size,
        num_items_in_batch=num_items_in_batch, lowrank_hidden=lowrank_hidden, lowrank_weight=lowrank_weight,
    )
    logits = None
    if want_logits:
        logits = F.linear(hidden, weight, bias)  # what lm_head computes (with the same LoRA dropout draw)
        if lowrank_hidden is not None:
            logits = logits + lowrank_hidden @ lowrank_weight.t()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
    return loss, logits


FSDP_HEAD_METHOD = "_fastft_fused_head"


def _fsdp_head_method(head: nn.Module):
    """:func:`fused_head` as a forward method of an lm_head that is its own FSDP2 unit (accelerate's FSDP2
    shards it so): FSDP gathers the weight before it, reshards after, and reduce-scatters its gradient in
    backward, as it does around ``head.forward`` (``torch.distributed.fsdp.register_fsdp_forward_method``)."""
    if FSDP_HEAD_METHOD not in head.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        head.__dict__[FSDP_HEAD_METHOD] = functools.partial(fused_head, head)
        register_fsdp_forward_method(head, FSDP_HEAD_METHOD)
    return getattr(head, FSDP_HEAD_METHOD)


def _head_operands(head: nn.Module, hidden: torch.Tensor):
    """(hidden, weight, bias, lowrank_hidden, lowrank_weight) in the dtype lm_head would compute in.

    A plain nn.Linear: its weight and bias, in the autocast dtype under autocast (else the dtypes must
    match, as for nn.Linear). A fastft LoRALinear: the base weight and bias plus the low-rank operands
    ``s · dropout(h) Aᵀ`` and ``B``, cast like LoRALinear casts them (to the input's or autocast dtype),
    with the same dropout draw it would make.
    """
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if _module_class(head) is LoRALinear:  # exactly LoRA (subclasses such as DoRA are refused by check_head)
        dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
        base = head.base_layer
        hidden = hidden.to(dtype)
        x = hidden
        if head.training and head.dropout_p > 0.0:
            mask = torch.empty(x.shape, device=x.device).bernoulli_(1.0 - head.dropout_p).bool()
            x = x * mask / (1.0 - head.dropout_p)
        lowrank_hidden = (x @ head.lora_A.to(dtype).t()) * head.scale
        bias = None if base.bias is None else base.bias.to(dtype)
        return hidden, base.weight.to(dtype), bias, lowrank_hidden, head.lora_B.to(dtype)
    weight, bias = head.weight, head.bias
    if autocast:  # as nn.Linear under autocast
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise TypeError(f"fastft fused loss: the hidden states are {hidden.dtype} but lm_head's weight is {weight.dtype}.")
    return hidden, weight, bias, None, None
