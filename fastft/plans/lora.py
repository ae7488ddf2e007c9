"""LoRA / QLoRA on a model: every targeted linear layer becomes a :class:`fastft.nn.LoRALinear`; the
modules named by ``modules_to_save`` (a classification model's head, by default) train in full."""
from ..config import ALL_LINEAR, LoRAConfig
from ..nn.experts import LoRAExperts
from ..nn.loldu import LoLDULinear
from ..nn.lora import LoRALinear
from ..targets import describe_stacks, is_fused_experts, is_linear, resolve_targets
from .registry import Plan, register_planner
from .lora_inits import input_covariances
from .modules_to_save import TrainInFull, resolve_modules_to_save


def _build(name, layer, config: LoRAConfig, expert_params: dict):
    if is_fused_experts(layer) and not is_linear(layer):
        return LoRAExperts(layer, config, params=expert_params.get(name), defer_attach=True, name=name)
    if config.init == "loldu":
        return LoLDULinear(layer, config, defer_attach=True)
    return LoRALinear.from_linear(layer, config, defer_attach=True)


def plan_lora(model, config: LoRAConfig, build=None) -> Plan:
    """The LoRA plan; ``build(name, layer, config, expert_params)`` makes each module (a variant's class)."""
    build = build or _build
    expert_params: dict[str, list[str]] = {}
    targets = resolve_targets(model, config.targets, config.layers,
                              accept=lambda m: is_linear(m) or is_fused_experts(m),
                              what="linear layer or fused MoE experts module", expert_params=expert_params)
    plan = Plan(config, swaps=[(name, build(name, layer, config, expert_params)) for name, layer in targets])
    if config.init == "corda" and not isinstance(config.calib, str):  # "saved": fastft.load brings the factors
        covariances = input_covariances(model, dict(targets), config.calib)
        for name, module in plan.swaps:
            module.corda_covariance = covariances[name]
        plan.notes.append(f"lora init=corda ({config.corda_mode}): input covariances of {len(targets)} layers from "
                          "the calibration batches")
    if config.targets == ALL_LINEAR:  # say, per stack, what all-linear took
        plan.notes.extend(f"{config.method} {line}" for line in describe_stacks(model, [n for n, _ in targets]))
    names, notes = resolve_modules_to_save(model, config.modules_to_save, [name for name, _ in plan.swaps])
    if names:
        edit = TrainInFull(model, names)
        if any(p.is_meta for p in edit.params.values()):
            raise ValueError(
                f"LoRAConfig.modules_to_save: {names} would train in full, but the model is on the meta device, so "
                "their original values (restored by unpatch(merge=False)) do not exist yet. Patch after loading the "
                "weights, or pass modules_to_save=() and unfreeze the head yourself after materializing."
            )
        plan.edits.append(edit)
    plan.notes.extend(notes)
    return plan


register_planner(LoRAConfig, plan_lora)
