"""LoRA / QLoRA on a model: every targeted linear layer becomes a :class:`fastft.nn.LoRALinear`; the
modules named by ``modules_to_save`` (a classification model's head, by default) train in full."""
from ..config import LoRAConfig
from ..nn.lora import LoRALinear
from .registry import Plan, plan_module_swaps, register_planner
from .modules_to_save import TrainInFull, resolve_modules_to_save


def plan_lora(model, config: LoRAConfig) -> Plan:
    plan = plan_module_swaps(model, config, lambda layer, cfg: LoRALinear.from_linear(layer, cfg, defer_attach=True))
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
