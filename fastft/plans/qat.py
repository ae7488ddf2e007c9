"""QAT on a model (RoSTE): fake-quantized linear layers, rotation folding, KV quantization in attention.

The plan, built without modifying the model:
  swaps   every linear layer inside the decoder layers -> :class:`fastft.nn.QuantLinear` (``down_proj``
          rotates its input online where R4 is kept);
  edits   :class:`~fastft.plans.qat_rotations.KeepOriginals` (a CPU copy of every tensor the patch may change, so a
          failed patch and ``unpatch(merge=False)`` restore them bit-exactly), then
          :class:`~fastft.plans.qat_rotations.RotationFolding` (norm scales, R1, R2, R4 folded into the weights), then
          :class:`AttentionEdit` (R3 and KV fake-quantization inside attention: the model's own config —
          this instance only — names the ``fastft_qat_<impl>`` attention function, and each attention
          module carries its settings).
Everything that can be refused is checked first: bits, group sizes that do not divide a layer's input
width, Hadamard sizes, the attention implementation, the model family, the LoRA combination.

``rotations="adaptive"`` measures, on the calibration batch, each layer's quantization error with and
without its online rotations (RoSTE's criterion: the mean squared error the quantizer leaves, for R4 on
``down_proj``'s weight plus its input, for R3 on the keys) and keeps a rotation where it lowers the
error. The plan's config is the resolved one (the per-layer form), which ``fastft.save`` and
``fastft.export_quantized`` write; the report lists the choice per layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ALL_LINEAR, LoRAConfig, QATConfig
from ..math.hadamard import hadamard_factorization
from ..ops.hadamard import hadamard_transform
from ..nn.qat import QuantLinear, activation_spec, kv_spec, weight_spec
from ..nn.qat_attention import (
    ATTENTION_PREFIX,
    SETTINGS_ATTR,
    SUPPORTED_ATTENTION,
    AttentionQuant,
    inner_attention,
    register_attention,
)
from .registry import Edit, Plan, register_planner
from .qat_layout import ModelLayout, model_layout
from .qat_rotations import KeepOriginals, Rotation, RotationFolding
from ..targets import find_layer_stack, resolve_targets


# ------------------------------------------------------------------------------------------ attention
@dataclass
class AttentionEdit(Edit):
    """Points this model instance's config at ``fastft_qat_<impl>`` and gives each attention module its
    :class:`~fastft.nn.qat_attention.AttentionQuant`; ``revert`` takes both back."""

    model: nn.Module
    settings: list[tuple[nn.Module, AttentionQuant]]
    implementation: str
    _previous: str | None = None

    def apply(self, model: nn.Module) -> None:
        register_attention()
        for module, settings in self.settings:
            module.__dict__[SETTINGS_ATTR] = settings
        self._previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = ATTENTION_PREFIX + self.implementation

    def revert(self, model: nn.Module, merge: bool) -> None:
        if self._previous is not None:
            self.model.config._attn_implementation = self._previous
            self._previous = None
        for module, _ in self.settings:
            module.__dict__.pop(SETTINGS_ATTR, None)


def attention_implementation(model: nn.Module) -> str:
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"QAT's R3 and KV quantization run inside attention for attn_implementation in {list(SUPPORTED_ATTENTION)}; "
            f"this model uses {implementation!r}. Load it with attn_implementation='sdpa' (or call "
            "model.set_attn_implementation('sdpa')), or use kv_bits=None and no 'r3'."
        )
    return implementation


# ---------------------------------------------------------------------------------- checks and sizes
def check_hadamard_size(size: int, what: str) -> None:
    try:
        hadamard_factorization(size)
    except ValueError as err:
        raise ValueError(f"QAT rotation {what}: {err}") from None


@dataclass
class Resolved:
    r1: bool
    r2: bool
    r3: tuple[int, ...]
    r4: tuple[int, ...]
    notes: list[str] = field(default_factory=list)

    def as_config(self) -> dict[str, Any]:
        return {"r1": self.r1, "r2": self.r2, "r3": self.r3, "r4": self.r4}


def resolve_rotations(config: QATConfig, n_layers: int) -> Resolved:
    rot = config.rotations
    every = tuple(range(n_layers))
    if rot == "adaptive":
        return Resolved(True, True, every if config.kv_bits is not None else (), every)  # candidates; calibration prunes
    if isinstance(rot, dict):
        for name in ("r3", "r4"):
            bad = [i for i in rot[name] if i >= n_layers]
            if bad:
                raise ValueError(f"QATConfig.rotations[{name!r}] names layers {bad}; the model has {n_layers} (0..{n_layers - 1}).")
        return Resolved(rot["r1"], rot["r2"], rot["r3"], rot["r4"])
    resolved = Resolved("r1" in rot, "r2" in rot, every if "r3" in rot else (), every if "r4" in rot else ())
    if resolved.r3 and config.kv_bits is None:
        resolved.r3 = ()
        resolved.notes.append("R3 skipped: it rotates queries and keys for quantized keys, and kv_bits is None")
    return resolved


# ----------------------------------------------------------------------------------------- adaptive
def _mse(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def calibrate(model: nn.Module, layout: ModelLayout, config: QATConfig, resolved: Resolved) -> list[str]:
    """Keep R3 / R4 per layer where they lower the quantization error on ``config.calib``; prunes
    ``resolved`` in place and returns one report line per layer. The model is run under ``no_grad`` with
    temporary hooks; nothing of it changes."""
    calib = config.calib
    inputs = dict(calib) if isinstance(calib, dict) else {"input_ids": calib}
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    if inputs["input_ids"].ndim == 1:
        inputs["input_ids"] = inputs["input_ids"][None]
    w_spec, a_spec, k_spec = weight_spec(config), activation_spec(config), kv_spec(config)
    n = len(layout.layers)
    act = {i: [0.0, 0.0, 0] for i in resolved.r4}  # sum of mse without / with R4, count
    keys = {i: [0.0, 0.0, 0] for i in resolved.r3}
    handles, attention = [], []

    def down_hook(index):
        def hook(module, args):
            x = args[0].detach()
            x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            stats = act[index]
            if a_spec is not None:
                rotated = hadamard_transform(x)
                stats[0] += _mse(a_spec(x), x)
                stats[1] += _mse(a_spec(rotated), rotated)
            stats[2] += 1

        return hook

    def key_recorder(index):
        def record(query, key, value):
            k = key.detach().float() if key.dtype != torch.float64 else key.detach()
            rotated = hadamard_transform(k)
            stats = keys[index]
            stats[0] += _mse(k_spec(k), k)
            stats[1] += _mse(k_spec(rotated), rotated)
            stats[2] += 1

        return record

    training = {m: m.training for m in model.modules()}
    try:
        for i in resolved.r4:
            handles.append(layout.layers[i].down.register_forward_pre_hook(down_hook(i)))
        if resolved.r3:
            implementation = attention_implementation(model)
            register_attention()
            for i in resolved.r3:
                module = layout.layers[i].attention.module
                module.__dict__[SETTINGS_ATTR] = AttentionQuant(False, None, inner_attention(module, implementation), key_recorder(i))
                attention.append(module)
            previous = model.config._attn_implementation
            model.config._attn_implementation = ATTENTION_PREFIX + implementation
        model.eval()
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            if resolved.r3:
                model.config._attn_implementation = previous
    finally:
        for handle in handles:
            handle.remove()
        for module in attention:
            module.__dict__.pop(SETTINGS_ATTR, None)
        for module, flag in training.items():
            module.training = flag

    q1 = Rotation(layout.hidden_size, seed=config.seed) if resolved.r1 else None
    q4 = Rotation(layout.intermediate_size)
    lines, r3, r4 = [], [], []
    for i in range(n):
        parts = []
        if i in act:
            weight = layout.layers[i].down.weight.detach()
            weight = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
            if q1 is not None:
                weight = q1.left_t(weight)
            rotated = q4.right(weight)
            count = max(act[i][2], 1)
            plain = _mse(w_spec(weight), weight) + act[i][0] / count
            with_r4 = _mse(w_spec(rotated), rotated) + act[i][1] / count
            keep = with_r4 < plain
            if keep:
                r4.append(i)
            parts.append(f"R4 {'kept' if keep else 'dropped'} (down_proj error {plain:.3g} -> {with_r4:.3g})")
        if i in keys:
            count = max(keys[i][2], 1)
            plain, with_r3 = keys[i][0] / count, keys[i][1] / count
            keep = with_r3 < plain
            if keep:
                r3.append(i)
            parts.append(f"R3 {'kept' if keep else 'dropped'} (key error {plain:.3g} -> {with_r3:.3g})")
        elif config.kv_bits is None:
            parts.append("R3 not considered (kv_bits=None)")
        lines.append(f"adaptive rotations, layer {i}: " + "; ".join(parts))
    resolved.r3, resolved.r4 = tuple(r3), tuple(r4)
    return lines


# ------------------------------------------------------------------------------------------ planner
def plan_qat(model: nn.Module, config: QATConfig) -> Plan:
    targets = resolve_targets(model, ALL_LINEAR)
    needs_layout = config.rotations != () or config.kv_bits is not None
    layout = model_layout(model) if needs_layout else None
    stack = find_layer_stack(model)
    n_layers = len(layout.layers) if layout is not None else len(stack.blocks)
    resolved = resolve_rotations(config, n_layers)

    if layout is not None:
        linears = {id(m) for layer in layout.layers for m in layer.readers + layer.writers}
        extra = [name for name, module in targets if id(module) not in linears]
        if extra and (resolved.r1 or resolved.r2):
            raise ValueError(
                f"QAT rotations: {extra[:3]} are linear layers inside the decoder that the {layout.family} rotation "
                "layout does not know, so folding would change the model. Use rotations=() for this model."
            )
    if resolved.r1:
        check_hadamard_size(layout.hidden_size, "R1 (hidden_size)")
    if resolved.r2 or resolved.r3:
        check_hadamard_size(layout.head_dim, "R2 / R3 (head_dim)")
    if resolved.r4:
        check_hadamard_size(layout.intermediate_size, "R4 (intermediate_size)")
    implementation = None
    if config.kv_bits is not None or resolved.r3:
        implementation = attention_implementation(model)

    # build (and so validate) every module before running anything on the model
    down_of_layer = {id(layer.down): layer.index for layer in layout.layers} if layout is not None else {}
    modules = {}
    for name, layer in targets:
        index = down_of_layer.get(id(layer))
        modules[name] = QuantLinear(layer, config, rotate_input=index is not None and index in resolved.r4, name=name)

    notes = list(resolved.notes)
    if config.rotations == "adaptive":
        notes += calibrate(model, layout, config, resolved)
        for name, module in modules.items():
            index = down_of_layer.get(id(module.base_layer))
            module.rotate_input = index is not None and index in resolved.r4

    edits: list[Any] = []
    keep_tensors: list[tuple[str, Tensor]] = []
    folding = None
    if layout is not None and (resolved.r1 or resolved.r2 or resolved.r4):
        folding = RotationFolding(model, layout, resolved.r1, resolved.r2, resolved.r4, config.seed)
        keep_tensors = folding.touched()
        if layout.tied and resolved.r1:
            notes.append("lm_head untied from embed_tokens (it carries the final norm's scale); tied again on unpatch")
    trained = [(f"{name}.{p}", getattr(m.base_layer, p)) for name, m in modules.items() for p in ("weight", "bias")
               if getattr(m.base_layer, p) is not None]
    seen = {id(t) for _, t in keep_tensors}
    keep = KeepOriginals(
        keep_tensors + [(label, t) for label, t in trained if id(t) not in seen],
        frozen={"embed_tokens.weight", "lm_head.weight", "norm.weight"},  # never trained nor merged into
    )
    edits.append(keep)
    if folding is not None:
        edits.append(folding)
    if implementation is not None:
        kv = kv_spec(config)
        settings = []
        for layer in layout.layers:
            module = layer.attention.module
            settings.append((module, AttentionQuant(layer.index in resolved.r3, kv, inner_attention(module, implementation))))
        edits.append(AttentionEdit(model, settings, implementation))

    rotations = [name.upper() for name in ("r1", "r2") if getattr(resolved, name)]
    rotations += [f"{name.upper()} on layers {list(getattr(resolved, name))}" for name in ("r3", "r4") if getattr(resolved, name)]
    notes.insert(0, f"QAT rotations: {', '.join(rotations) or 'none'}" + (f" (R1 seed {config.seed})" if resolved.r1 else ""))
    if config.kv_bits is not None:
        notes.append(f"keys and values fake-quantized in attention ({kv_spec(config).describe()}) via attn_implementation "
                     f"'{ATTENTION_PREFIX}{implementation}' on this model instance")

    plan_config = dataclasses.replace(config, rotations=resolved.as_config(), calib=None)
    plan = Plan(plan_config, swaps=list(modules.items()), edits=edits, notes=notes)
    plan.compose = lambda plans: compose_with_lora(plan, keep, {id(t) for _, t in keep_tensors}, plans)
    return plan


def compose_with_lora(plan: Plan, keep: KeepOriginals, folded: set[int], plans: list[Plan]) -> list[Plan]:
    """QAT hosts LoRA: where both target a layer, the LoRALinear wraps the QuantLinear (which then quantizes
    ``W + s·BA``); with any LoRA in the call the QAT base is frozen. QAT is applied first."""
    others = [p for p in plans if p is not plan]
    quant = dict(plan.swaps)
    loras = [p for p in others if isinstance(p.config, LoRAConfig)]
    for other in others:
        shared = [name for name, _ in other.swaps if name in quant]
        if shared and other not in loras:
            raise ValueError(f"QATConfig combines with LoRAConfig only; {other.config.method} also targets {shared[:3]}.")
        for name, module in other.swaps:
            if name in quant:
                module.rebase(quant[name])
            elif id(getattr(getattr(module, "base_layer", None), "weight", None)) in folded:
                raise ValueError(
                    f"{other.config.method} targets {name!r}, which QAT's R1 rotates but does not quantize (its "
                    "rotation is undone from a kept copy on unpatch, which would drop the update). Target only the "
                    "decoder's linear layers, or use QATConfig(rotations=()) / without 'r1'."
                )
    if loras:
        for _, module in plan.swaps:
            module.trains_weight = False
        keep.tensors = [(label, t) for label, t in keep.tensors if id(t) in folded]  # the base no longer trains
    return [plan] + others


register_planner(QATConfig, plan_qat)
