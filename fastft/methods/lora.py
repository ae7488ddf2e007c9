"""LoRA / QLoRA on a model: every targeted linear layer becomes a :class:`fastft.nn.LoRALinear`."""
from ..config import LoRAConfig
from ..nn.lora import LoRALinear
from ..patch import Plan, plan_module_swaps, register_planner


def plan_lora(model, config: LoRAConfig) -> Plan:
    return plan_module_swaps(model, config, lambda layer, cfg: LoRALinear.from_linear(layer, cfg, defer_attach=True))


register_planner(LoRAConfig, plan_lora)
