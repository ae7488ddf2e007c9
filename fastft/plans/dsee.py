"""DSEE on a model: LoRA's plan with every linear target a :class:`fastft.nn.DSEELinear` (low-rank + sparse)."""
from ..config import DSEEConfig
from ..nn.dsee import DSEELinear
from ..targets import is_fused_experts, is_linear
from .lora import plan_lora
from .registry import Plan, register_planner


def _build(name, layer, config: DSEEConfig, expert_params: dict):
    if is_fused_experts(layer) and not is_linear(layer):
        raise ValueError(f"DSEEConfig: {name} is a fused MoE experts module; DSEE patches linear layers only. "
                         "Leave the experts out of targets.")
    return DSEELinear(layer, config, defer_attach=True)


def plan_dsee(model, config: DSEEConfig) -> Plan:
    plan = plan_lora(model, config, build=_build)
    plan.notes.append(f"dsee: {len(plan.swaps)} layers, low-rank r={config.r} + sparse {config.sparse} entries each "
                      f"({config.support})")
    return plan


register_planner(DSEEConfig, plan_dsee)
