"""qGOFT on a model: every targeted linear layer becomes a :class:`fastft.nn.QGOFTLinear`, and a
:class:`~fastft.plans.regularization.RegularizationEdit` adds the layers' soft orthogonality terms to the loss."""
from ..config import ALL_LINEAR
from ..config.qgoft import QGOFTConfig
from ..math.givens import max_stages
from ..nn.qgoft import QGOFTLinear
from ..targets import describe_stacks, linear_features, resolve_targets
from .registry import Plan, register_planner
from .regularization import RegularizationEdit


def plan_qgoft(model, config: QGOFTConfig) -> Plan:
    targets = resolve_targets(model, config.targets, config.layers)  # a 4-bit layer: QGOFTLinear refuses it
    if config.stages is not None:
        too_few = [(name, linear_features(layer)[0]) for name, layer in targets
                   if config.stages > max_stages(linear_features(layer)[0])]
        if too_few:
            name, d = too_few[0]
            raise ValueError(
                f"QGOFTConfig.stages={config.stages}: module {name!r} has {d} input features, which allow at most "
                f"{max_stages(d)} stages ({len(too_few)} module(s) like it); lower stages or use None (log2 of each "
                "layer's padded width)."
            )
    swaps = [(name, QGOFTLinear(layer, config.stages, config.learn_scale, config.relative_angle,
                                config.orthogonality_weight)) for name, layer in targets]
    plan = Plan(config, swaps=swaps)
    if config.targets == ALL_LINEAR:
        plan.notes.extend(f"{config.method} {line}" for line in describe_stacks(model, [n for n, _ in targets]))
    if config.orthogonality_weight and (config.learn_scale or config.relative_angle):
        plan.edits.append(RegularizationEdit())
    return plan


register_planner(QGOFTConfig, plan_qgoft)
