"""Modules trained in full beside the adapters (PEFT's ``modules_to_save``): a task head, typically.

A classification model's head (``classifier`` of ``BertForSequenceClassification``, ``score`` of
``LlamaForSequenceClassification``, ``qa_outputs`` of a QA model) is freshly initialised when the model is
loaded: frozen, it would stay random. PEFT's task types (``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``) train
it in full through ``modules_to_save``; ``LoRAConfig(modules_to_save="auto")`` does the same.

Unlike PEFT, the module is not wrapped: it trains in place, under its own parameter names, and a CPU copy
of its original values lets ``unpatch(merge=False)`` restore it (``merge=True`` keeps what it learned).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..report import PatchedModule
from ..targets import is_linear
from .registry import Edit

TASK_MODEL_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice", "ForQuestionAnswering")
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def _inside(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def resolve_modules_to_save(model: nn.Module, spec, lora_targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """The qualified names of the modules to train in full, and notes for the report.

    Raises ``ValueError`` (before anything changes) for a suffix that matches nothing, a module that also
    carries an adapter, or a module without trainable float parameters.
    """
    notes: list[str] = []
    if spec == "auto":
        cls = type(model).__name__
        if not cls.endswith(TASK_MODEL_SUFFIXES):
            return [], []
        found = [n for n in TASK_HEAD_NAMES if isinstance(model._modules.get(n), nn.Module)]
        if not found:
            notes.append(
                f"modules_to_save='auto': {cls} has no top-level {'/'.join(TASK_HEAD_NAMES)}; its task head is "
                "frozen. Name it: LoRAConfig(modules_to_save=[...])."
            )
            return [], notes
        names = []
        for name in found:
            adapted = [t for t in lora_targets if _inside(t, name)]
            if adapted:
                notes.append(f"modules_to_save='auto': {name!r} carries LoRA adapters ({adapted[0]}), so it is not also trained in full.")
            else:
                names.append(name)
    else:
        named = [n for n, _ in model.named_modules() if n]
        names = []
        for suffix in spec:
            hits = [n for n in named if n == suffix or n.endswith("." + suffix)]
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in named})
                raise ValueError(
                    f"LoRAConfig.modules_to_save: {suffix!r} matches no module in {type(model).__name__}. "
                    f"Module names in this model: {leaves}."
                )
            names.extend(h for h in hits if h not in names)
        names = [n for n in names if not any(o != n and _inside(n, o) for o in names)]  # outermost only
        for name in names:
            adapted = [t for t in lora_targets if _inside(t, name) or _inside(name, t)]
            if adapted:
                raise ValueError(
                    f"LoRAConfig: {name!r} is both in modules_to_save (trained in full) and a LoRA target "
                    f"({adapted[0]}); choose one."
                )
    for name in names:
        params = list(model.get_submodule(name).parameters())
        if not params or not all(p.is_floating_point() for p in params):
            raise ValueError(
                f"LoRAConfig.modules_to_save: {name!r} has no float parameters to train "
                f"({type(model.get_submodule(name)).__name__})."
            )
    return names, notes


class TrainInFull(Edit):
    """The :class:`fastft.patch.Edit` of ``modules_to_save``: these modules' parameters train in place."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.params = {
            f"{name}.{pname}": param
            for name in self.names
            for pname, param in model.get_submodule(name).named_parameters()
        }
        self.original: dict[str, torch.Tensor] = {}
        self.flags: dict[str, bool] = {}

    def apply(self, model: nn.Module) -> None:
        self.original = {key: p.detach().to("cpu", copy=True) for key, p in self.params.items()}
        self.flags = {key: p.requires_grad for key, p in self.params.items()}
        for param in self.params.values():
            param.requires_grad_(True)

    def revert(self, model: nn.Module, merge: bool) -> None:
        with torch.no_grad():
            for key, param in self.params.items():
                if not merge and key in self.original:
                    param.copy_(self.original[key])
                if key in self.flags:
                    param.requires_grad_(self.flags[key])
        self.original, self.flags = {}, {}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What ``fastft.save`` stores: ``<module>.<parameter>`` -> value."""
        return {key: p.detach() for key, p in self.params.items()}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [key for key in self.params if key not in tensors]
        if missing:
            raise ValueError(
                f"the saved adapter has no weights for the modules trained in full ({missing[:3]}); it was saved "
                "without them (e.g. with modules_to_save=())."
            )
        with torch.no_grad():
            for key, param in self.params.items():
                if tensors[key].shape != param.shape:
                    raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} != {tuple(param.shape)}")
                param.copy_(tensors[key].to(param.device))

    def report_rows(self, model: nn.Module) -> list[PatchedModule]:
        rows = []
        for name in self.names:
            module = model.get_submodule(name)
            shape = f"{module.in_features}->{module.out_features}" if is_linear(module) else type(module).__name__
            rows.append(PatchedModule(
                name=name,
                kind="full",
                backend="torch",
                shape=shape,
                trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
                detail="modules_to_save: trained in full",
            ))
        return rows
