"""A fused loss on a ``*ForCausalLM``: with labels, the model's forward never builds the logits.

``fastft.patch(model, LossConfig(...))`` installs, on the model INSTANCE (never its class), a forward
(the run-time code: :mod:`fastft.nn.fused_loss`; this file plans and installs it) that behaves exactly
like the class's forward except when ``labels`` are given:

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

Without labels the class's forward runs untouched (generation, inference). Only model classes whose
forward is this sequence — read in transformers and tested against its own loss — are accepted; others
(mixture-of-experts models that add a router loss, models that scale their logits) are refused at patch
time, as are lm_heads the op cannot compute through (an adapter other than fastft's LoRA, a 4-bit
lm_head): such an adapter would otherwise silently never train. A fastft LoRA lm_head (LoRAConfig
targeting "lm_head" in the same call) is computed through: base weight plus the low-rank term
``s·dropout(h)Aᵀ · Bᵀ``, still without logits, and A and B get their gradients. ``fastft.unpatch`` restores the previous
forward. A lone LossConfig freezes nothing: every parameter keeps its ``requires_grad`` (full fine-tuning
works); with a LoRAConfig in the same call, LoRA's freezing applies.
"""
from __future__ import annotations

import types
from typing import Any, Optional

from torch import nn

from ..config import LossConfig
from ..dispatch import backend_for
from ..nn.fused_loss import (  # noqa: F401  (SETTINGS_ATTR re-exported: where the settings live on a model)
    MISSING, SETTINGS_ATTR, FusedLossSettings, causal_lm_forward, check_head, class_signature,
    refuse_foreign_fused_head,
)
from ..report import PatchedModule
from .registry import Edit, Plan, register_planner

# Classes whose forward is decoder -> slice_logits_to_keep -> lm_head [-> final softcap] -> ForCausalLMLoss,
# read in transformers 5.x and checked against transformers' own loss in tests/plans/test_loss_patch.py.
SUPPORTED_MODELS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
)
def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("the model's output embeddings (lm_head) are not one of its submodules")


def _model_softcap(model: nn.Module, config: LossConfig) -> Optional[float]:
    own = getattr(model.config, "final_logit_softcapping", None)
    if config.logit_softcap is None:
        return None if own is None else float(own)
    if own is not None and float(own) != config.logit_softcap:
        raise ValueError(
            f"LossConfig.logit_softcap={config.logit_softcap} but this model already softcaps its logits at "
            f"final_logit_softcapping={own}; leave logit_softcap=None to use the model's."
        )
    return config.logit_softcap


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ValueError(
            f"fastft LossConfig supports {list(SUPPORTED_MODELS)}; got {name}. The fused loss replaces the "
            "model's head-and-loss step, so it is enabled only for models whose forward fastft has checked "
            "(no router auxiliary loss, no logit scaling)."
        )
    if "_loss_function" in model.__dict__:
        raise ValueError(
            "fastft LossConfig: this model has a custom loss_function set on it; the fused loss would replace "
            "it. Remove it (del model._loss_function) or drop LossConfig."
        )
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if LOSS_MAPPING.get(getattr(model, "loss_type", None) or "ForCausalLM") is not ForCausalLMLoss:
        raise ValueError(
            f"fastft LossConfig: this model's loss_type={model.loss_type!r} is not transformers' causal-LM "
            "cross-entropy, which is what the fused loss replaces."
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("fastft LossConfig: encoder-decoder models are not supported (decoder-only CausalLMs).")


class FusedLossForward(Edit):
    """The model-level :class:`fastft.patch.Edit` of a LossConfig: install / remove the instance forward."""

    def __init__(self, config: LossConfig, head_name: str, softcap: Optional[float]):
        self.config = config
        self.head_name = head_name
        self.softcap = softcap
        self.previous: Any = MISSING

    def check_planned_head(self, model: nn.Module, planned: dict[str, nn.Module]) -> None:
        """Run by ``fastft.patch`` before anything changes: lm_head as it will be after every config."""
        check_head(planned.get(self.head_name, model.get_submodule(self.head_name)), self.head_name)

    def apply(self, model: nn.Module) -> None:
        self.previous = model.__dict__.get("forward", MISSING)
        previous = None if self.previous is MISSING else self.previous
        model.__dict__[SETTINGS_ATTR] = FusedLossSettings(
            self.config, self.head_name, self.softcap, previous, class_signature(type(model))
        )
        model.__dict__["forward"] = types.MethodType(causal_lm_forward(type(model)), model)
        model.register_forward_pre_hook(refuse_foreign_fused_head, with_kwargs=True)

    def revert(self, model: nn.Module, merge: bool) -> None:
        for key, hook in list(model._forward_pre_hooks.items()):
            if hook is refuse_foreign_fused_head:
                del model._forward_pre_hooks[key]
                model._forward_pre_hooks_with_kwargs.pop(key, None)
        model.__dict__.pop(SETTINGS_ATTR, None)
        if self.previous is MISSING:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = self.previous
        self.previous = MISSING

    def report_rows(self, model: nn.Module) -> list[PatchedModule]:
        head = model.get_submodule(self.head_name)
        lora = getattr(head, "base_layer", None) is not None
        weight = head.base_layer.weight if lora else head.weight
        cfg = self.config
        parts = [f"kind={cfg.kind}", f"chunk={cfg.chunk_size or 'auto'}"]
        if lora:
            parts.append(f"through LoRA r={head.r}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if cfg.label_smoothing:
            parts.append(f"smoothing={cfg.label_smoothing:g}")
        if cfg.z_loss:
            parts.append(f"z_loss={cfg.z_loss:g}")
        if cfg.kind == "talr":
            parts.append(f"w_min={cfg.talr_min_weight:g}")
        parts.append("logits only when asked")
        return [PatchedModule(
            name=self.head_name,
            kind=f"loss-{cfg.kind}",
            backend=backend_for("linear_cross_entropy", weight.device),
            shape=f"{weight.shape[1]}->{weight.shape[0]}",
            trainable=sum(p.numel() for p in head.parameters() if p.requires_grad),
            detail=" ".join(parts),
        )]


def plan_loss(model: nn.Module, config: LossConfig) -> Plan:
    _check_model(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"fastft LossConfig: {type(model).__name__} has no output embeddings (lm_head).")
    head_name = _qualified_name(model, head)
    check_head(head, head_name)
    softcap = _model_softcap(model, config)
    edit = FusedLossForward(config, head_name, softcap)
    notes = [
        f"fused {config.kind} loss through '{head_name}': with labels, {type(model).__name__}.forward returns the "
        "loss without materialising logits (logits only with return_logits=True or in eval mode)"
    ]
    return Plan(config, edits=[edit], notes=notes, freeze_base=False, checks=[edit.check_planned_head])


register_planner(LossConfig, plan_loss)
