"""Selective LoRA on a model: LoRA's plan with every linear target a gated
:class:`fastft.nn.SelectiveLoRALinear`, plus the hook that adds the gates' L1 term to ``output.loss``."""
from ..config import SelectiveLoRAConfig
from ..nn.selective_lora import SelectiveLoRALinear
from ..targets import is_fused_experts, is_linear
from .lora import plan_lora
from .registry import Plan, register_planner
from .regularization import RegularizationEdit


def _build(name, layer, config: SelectiveLoRAConfig, expert_params: dict):
    if is_fused_experts(layer) and not is_linear(layer):
        raise ValueError(f"SelectiveLoRAConfig: {name} is a fused MoE experts module; gated blocks are linear layers "
                         "only. Leave the experts out of targets.")
    return SelectiveLoRALinear(layer, config, defer_attach=True)


def plan_selective_lora(model, config: SelectiveLoRAConfig) -> Plan:
    plan = plan_lora(model, config, build=_build)
    if config.l1:
        plan.edits.append(RegularizationEdit())
    plan.notes.append(f"selective_lora: {len(plan.swaps)} gated blocks (τ={config.threshold:g}, σ₀={config.score_init:g}, "
                      f"l1={config.l1:g}); fastft.nn.selective_lora_active(model) counts the open ones")
    return plan


register_planner(SelectiveLoRAConfig, plan_selective_lora)
