"""The planner registry: what a method does to a whole model, as data that ``fastft.patch`` applies.

A planner is a function ``(model, config) -> Plan``, registered for its config class with
:func:`register_planner` by the method's file in ``fastft/plans/``. It resolves targets, builds and
validates the new modules, and modifies nothing in the model: ``fastft.patch`` (one level up) applies
the plans transactionally and rolls back on any error. A :class:`Plan` holds the module swaps and
optional model-level :class:`Edit` objects (apply / revert pairs) for what is not a module swap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..config import ALL_LINEAR, MethodConfig
from ..targets import describe_stacks, resolve_targets

__all__ = ["Edit", "PLANNERS", "Plan", "Planner", "plan_module_swaps", "register_planner"]


class Edit:
    """A model-level change a method makes besides swapping modules (e.g. a weight permutation).

    Subclasses implement ``apply`` and ``revert``; the rest defaults to "nothing": ``adapter_parameters()``
    (kept trainable), ``report_rows(model)`` (rows of the patch report), ``adapter_tensors()`` /
    ``load_adapter_tensors(tensors)`` (what ``fastft.save`` / ``load`` store).
    """

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__}.apply")

    def revert(self, model: nn.Module, merge: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__}.revert")

    def adapter_parameters(self) -> list[nn.Parameter]:
        return []

    def report_rows(self, model: nn.Module) -> list:
        return []

    def adapter_tensors(self) -> dict:
        return {}

    def load_adapter_tensors(self, tensors: dict) -> None:
        """Nothing to load by default (an edit that stores no tensors)."""


@dataclass
class Plan:
    """What one config does to a model: module swaps (qualified name -> new module) and edits."""

    config: MethodConfig
    swaps: list[tuple[str, nn.Module]] = field(default_factory=list)
    # False for methods that add no adapter and leave training to the model's own parameters (a fused loss)
    freeze_base: bool = True
    # run once every plan is built, before anything is applied: check(model, {name: planned module})
    checks: list[Callable[[nn.Module, dict[str, nn.Module]], None]] = field(default_factory=list)
    edits: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (all plans of the call) -> the plans in the order to apply them. Lets a method host the modules of
    # another on the layers both target (e.g. QAT's QuantLinear as the base a LoRALinear wraps), validating
    # the combination before anything is applied. A wrapping module's ``base_layer`` is the hosted one.
    compose: Callable[[list["Plan"]], list["Plan"]] | None = None
    # qualified names of modules whose weights the edits rewrite in place (no other plan may swap them)
    rewrites: list[str] = field(default_factory=list)

    def prepare(self) -> None:
        """What may fail in initialisation (PiSSA's SVD), done into the new modules only, before anything is
        applied; a failure names the module."""
        for name, module in self.swaps:
            try:
                getattr(module, "prepare", lambda: None)()
            except Exception as err:
                err.add_note(f"fastft.patch: while preparing {self.config.method} for module {name!r}; nothing was changed.")
                raise

    def attach(self) -> None:
        """Second phase of building: initialisation that touches the base layers (e.g. PiSSA's residual)."""
        for _, module in self.swaps:
            module.attach()

    def discard(self) -> None:
        """Undo what :meth:`attach` changed (exact up to float rounding for a weight rewrite)."""
        for _, module in self.swaps:
            module.unpatched(merge=False)

    def adapter_parameters(self) -> list[nn.Parameter]:
        params = []
        for _, module in self.swaps:
            params.extend(module.adapter_parameters().values())
        for edit in self.edits:
            params.extend(edit.adapter_parameters())
        return params


Planner = Callable[[nn.Module, MethodConfig], Plan]
PLANNERS: dict[type, Planner] = {}


def register_planner(config_class: type, planner: Planner) -> None:
    PLANNERS[config_class] = planner


def plan_module_swaps(model: nn.Module, config: MethodConfig, build: Callable[[nn.Module, Any], nn.Module]) -> Plan:
    """Plan for methods that replace each targeted linear layer by ``build(layer, config)``.

    ``build`` validates and allocates but must not modify the layer; anything that does belongs in the
    module's ``attach()``, which ``patch`` calls once every plan is built.
    """
    targets = resolve_targets(model, config.targets, config.layers)
    plan = Plan(config, swaps=[(name, build(layer, config)) for name, layer in targets])
    if config.targets == ALL_LINEAR:  # say, per stack, what all-linear took
        plan.notes.extend(f"{config.method} {line}" for line in describe_stacks(model, [n for n, _ in targets]))
    return plan
