"""``fastft.patch`` / ``fastft.unpatch``: swap a model's layers for fastft modules, reversibly.

The path of one call:
  1. every config is planned against the model (targets resolved, new modules built and validated,
     nothing in the model modified): a bad config or target raises here and leaves the model exactly as
     it was;
  2. the plans are applied (model-level edits, then module swaps on the parent instances — never on
     transformers classes), everything that is not an adapter parameter is frozen, and the patch state is
     recorded on the model instance (``model._fastft_patch``) so ``unpatch``, ``save`` and ``export_peft``
     can find it;
  3. a :class:`~fastft.report.PatchReport` lists each patched module with the backend it will run on.

Methods plug in by registering a planner for their config class (``fastft.plans.registry.register_planner``):
a function ``(model, config) -> Plan``, one file per method in ``fastft/plans/``. A ``Plan`` holds the
module swaps and optional model-level ``Edit`` objects (apply / revert pairs) for what is not a module
swap. Importing ``fastft.plans`` registers every method's planner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .config import LoRAConfig, MethodConfig, SparseConfig, check_bool
from .dispatch import backend_for, path_for
from .distributed import refuse_distributed, refuse_sharded_unpatch, unwrap
from .nn import FASTFT_MODULES
from . import plans as _plans  # noqa: F401  (importing fastft.plans registers every method's planner)
from .plans.registry import PLANNERS, Edit, Plan, Planner, plan_module_swaps, register_planner  # noqa: F401  (re-exported)
from .policies import selection_state
from .report import PatchedModule, PatchReport, count_parameters, logical_numel

STATE_ATTR = "_fastft_patch"


@dataclass
class PatchState:
    """Recorded on the patched model instance."""

    plans: list[Plan]
    requires_grad: dict[str, bool]

    @property
    def configs(self) -> list[MethodConfig]:
        return [plan.config for plan in self.plans]

    def modules(self) -> list[tuple[str, nn.Module]]:
        return [swap for plan in self.plans for swap in plan.swaps]


def patch_state(model: nn.Module) -> PatchState | None:
    """The fastft patch state of ``model`` (looking through a DDP wrapper), or None if it is not patched."""
    return unwrap(model).__dict__.get(STATE_ATTR)


def is_patched(model: nn.Module) -> bool:
    return patch_state(model) is not None


def _refuse_selected(model: nn.Module, what: str) -> None:
    if selection_state(model) is not None:
        raise ValueError(f"fastft.{what}: this model has a fastft.select_trainable selection; call fastft.unselect(model) first.")


def _refuse_foreign(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.patch expects a torch.nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "patch")
    _refuse_selected(model, "patch")
    if is_patched(model):
        n = len(patch_state(model).modules())
        raise ValueError(
            f"this model is already patched by fastft ({n} modules). Call fastft.unpatch(model) first, "
            "or pass every config in one call: fastft.patch(model, [config_a, config_b])."
        )
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise ValueError(
            "this is a PEFT model (it contains PEFT adapter layers). fastft patches plain transformers models: "
            "load a PEFT LoRA adapter with fastft.from_peft(base_model, adapter_dir), or call "
            "peft_model.merge_and_unload() / .get_base_model() first."
        )
    inner = [n for n, m in model.named_modules() if isinstance(m, FASTFT_MODULES)]
    if inner:
        raise ValueError(f"this model already contains fastft modules ({inner[:3]}...); unpatch it first.")


def _refuse_meta(model: nn.Module, configs: Sequence[MethodConfig]) -> None:
    """On the meta device (``init_empty_weights``, ``torch.device("meta")``) only methods whose initialisation
    does not read the weights can be patched: LoRA with init 'default' / 'gaussian' (initialised when the model
    is materialized) and the fused loss. Anything else is refused here, before anything changes."""
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is None:
        return
    for cfg in configs:
        if cfg.method == "loss":
            continue
        if isinstance(cfg, LoRAConfig) and not cfg.dora and not cfg.holds_residual:
            continue
        if isinstance(cfg, SparseConfig):
            what = (f"sparse fine-tuning (method={cfg.method!r}) selects its support from the weights and builds its "
                    "indices and values beside them")
        else:
            what = {"s2ft": "S²FT selects and permutes channels by the weights",
                    "qat": "QAT folds rotations into the weights and quantizes them"}.get(
                cfg.method, f"LoRAConfig(dora={getattr(cfg, 'dora', False)}, init={getattr(cfg, 'init', None)!r}) "
                            "initialises from the base weights")
        raise ValueError(
            f"fastft.patch: the model is on the meta device (e.g. {meta!r} is not materialized), and {what}, which "
            "meta tensors do not hold. Load the weights first, then patch; or patch with a LoRAConfig whose init is "
            "'default' or 'gaussian' (without dora), which is initialised when the model is materialized "
            "(model.to_empty(device=...))."
        )


def _device_of(model: nn.Module) -> str:
    for param in model.parameters():
        return str(param.device)
    return "cpu"


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def build_report(model: nn.Module) -> PatchReport:
    """The report of a patched model as it stands now (devices and flags read afresh)."""
    model = unwrap(model)
    state = patch_state(model)
    rows = []
    for name, module in state.modules():
        device = next(module.parameters()).device
        trainable = sum(logical_numel(p) for p in module.adapter_parameters().values() if p.requires_grad)
        detail = module.report_detail()
        rows.append(
            PatchedModule(
                name=name,
                kind=module.kind,
                backend=backend_for(module.op, device),
                shape=f"{module.in_features}->{module.out_features}",
                trainable=trainable,
                detail=detail,
                path=path_for(module.op, device),
            )
        )
    for plan in state.plans:
        for edit in plan.edits:
            rows.extend(edit.report_rows(model))
    trainable, total = count_parameters(model)
    notes = [note for plan in state.plans for note in plan.notes]
    return PatchReport(
        model=type(model).__name__,
        device=_device_of(model),
        modules=rows,
        trainable_params=trainable,
        total_params=total,
        methods=[repr(c) for c in state.configs],
        notes=notes,
    )


def patch(model: nn.Module, config: MethodConfig | Sequence[MethodConfig]) -> PatchReport:
    """Patch ``model`` in place with one config or a list of configs; return a :class:`PatchReport`.

    Everything that is not an adapter parameter ends frozen (unless every config leaves the base alone, as
    a lone ``LossConfig`` does). On any error the model is left unchanged.
    """
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs:
        raise ValueError("fastft.patch needs at least one config, e.g. fastft.LoRAConfig(r=16).")
    for cfg in configs:
        if type(cfg) not in PLANNERS:
            raise TypeError(
                f"fastft.patch: {type(cfg).__name__} is not a fastft config; "
                f"use one of {[c.__name__ for c in PLANNERS]}."
            )
    methods = [cfg.method for cfg in configs]
    if len(set(methods)) != len(methods):
        raise ValueError(f"fastft.patch: one config per method, got methods {methods}.")
    _refuse_foreign(model)
    _refuse_meta(model, configs)

    plans = [PLANNERS[type(cfg)](model, cfg) for cfg in configs]
    for composer in [plan.compose for plan in plans if plan.compose is not None]:
        plans = composer(plans)
    placed: dict[str, nn.Module] = {}
    twice = set()
    for name, module in (swap for plan in plans for swap in plan.swaps):
        if name in placed and getattr(module, "base_layer", None) is not placed[name]:
            twice.add(name)
        placed[name] = module
    if twice:
        raise ValueError(f"two configs target the same modules: {sorted(twice)[:5]}")
    rewritten = {name: plan.config.method for plan in plans for name in plan.rewrites}
    clash = [(n, plan.config.method) for plan in plans for n, _ in plan.swaps if rewritten.get(n, plan.config.method) != plan.config.method]
    if clash:
        name, method = clash[0]
        raise ValueError(
            f"fastft.patch: {method} targets '{name}', whose weight {rewritten[name]} rewrites (permutes) in place; "
            f"leave it out of the {method} targets."
        )

    planned = {name: module for plan in plans for name, module in plan.swaps}  # the outermost module per name
    for check in [check for plan in plans for check in plan.checks]:
        check(model, planned)
    for plan in plans:
        plan.prepare()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    applied: list[tuple[str, nn.Module]] = []
    edits_done: list[Any] = []
    try:
        for plan in plans:
            plan.attach()
            for edit in plan.edits:
                edit.apply(model)
                edits_done.append(edit)
            for name, module in plan.swaps:
                original = model.get_submodule(name)
                _swap(model, name, module)
                applied.append((name, original))
    except Exception:
        for name, original in reversed(applied):
            _swap(model, name, original)
        for edit in reversed(edits_done):
            edit.revert(model, merge=False)
        for plan in plans:
            plan.discard()
        raise

    adapter_ids = {id(p) for plan in plans for p in plan.adapter_parameters()}
    if any(plan.freeze_base for plan in plans):
        for param in model.parameters():
            if id(param) not in adapter_ids:
                param.requires_grad_(False)
    model.__dict__[STATE_ATTR] = PatchState(plans=plans, requires_grad=requires_grad)
    return build_report(model)


def unpatch(model: nn.Module, merge: bool = True) -> nn.Module:
    """Restore plain modules. ``merge=True`` folds each update into the base weight, ``False`` drops it.

    The original ``requires_grad`` flags come back. Returns the model (inside a DDP wrapper: the wrapped one).
    """
    check_bool("fastft.unpatch: merge", merge)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.unpatch expects a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    state = patch_state(model)
    if state is None:
        raise ValueError("fastft.unpatch: this model is not patched by fastft (nothing to undo).")
    _refuse_selected(model, "unpatch")
    refuse_sharded_unpatch(model)
    for plan in reversed(state.plans):
        for name, module in reversed(plan.swaps):
            _swap(model, name, module.unpatched(merge))
        for edit in reversed(plan.edits):
            edit.revert(model, merge)
    del model.__dict__[STATE_ATTR]
    for name, param in model.named_parameters():
        if name in state.requires_grad:
            param.requires_grad_(state.requires_grad[name])
    return model
