"""``SparseConfig``: sparse fine-tuning methods on a sparse delta ``W + ΔW`` (k trainable entries per layer).

One class with a ``method`` field: "spiel", "lt-sft", "diff-pruning", "sara", "gmt", "mft", "sct", and the
fixed supports "magnitude" / "random". The method-specific options are fields validated per method: a
field that a method does not use must keep its default (an option set for nothing is an error, never
silently ignored). See docs/methods/sparse.md ("Methods") for the math of each.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from .checks import (
    ALL_LINEAR,
    CONFIG_CLASSES,
    MethodConfig,
    Targets,
    WrongType,
    check_bool,
    check_layers,
    check_number,
    check_targets,
    with_known_names,
)

METHODS = ("spiel", "lt-sft", "diff-pruning", "sara", "gmt", "mft", "sct", "magnitude", "random")
SUPPORTS = ("random", "magnitude", "smallest")

# field -> the methods that use it (every other method must leave it at its default)
OPTIONS: dict[str, tuple[str, ...]] = {
    "regrow_every": ("spiel",),
    "prune_fraction": ("spiel",),
    "candidate_factor": ("spiel",),
    "phase1": ("lt-sft",),
    "l0_weight": ("diff-pruning",),
    "temperature": ("diff-pruning",),
    "gate_init": ("diff-pruning",),
    "final_density": ("diff-pruning",),
    "fix_at_step": ("diff-pruning",),
    "keep_fraction": ("gmt",),
    "score_init": ("mft",),
    "nuclear_weight": ("sara",),
    "calib": ("sct",),
    "support": ("diff-pruning", "gmt", "mft"),
}


@with_known_names
@dataclass
class SparseConfig(MethodConfig):
    """Sparse fine-tuning: each targeted linear layer trains k = max(1, round(density · out · in)) entries
    of a delta on its frozen weight, ``y = x (W + ΔW)ᵀ + b`` (:class:`fastft.nn.sparse_delta.SparseDeltaLinear`);
    the methods differ in which entries train and how the support changes.

    Args:
        method: "spiel" (prune by |Δ| / regrow by accumulated candidate gradients every ``regrow_every``
            steps), "lt-sft" (the top-k most changed weights of a phase-1 fine-tune given as ``phase1``),
            "diff-pruning" (hard-concrete L0 gates on the delta, then a fixed sparsity), "sara" (the k
            smallest-|W| weights), "gmt" (per-step gradient masking within the support), "mft" (learned
            straight-through binary masks over the base weights at the support), "sct" (whole input
            channels with the largest calibration activations), "magnitude" (the k largest |W|, fixed) or
            "random" (k random entries, fixed).
        density: the fraction of each targeted weight that trains, in (0, 1]. For "sct" the fraction of
            input channels (whole columns): ``max(1, round(density · in))`` columns.
        targets: "all-linear", module-name suffixes or a regular expression (as :class:`fastft.LoRAConfig`).
        layers: decoder-layer indices to touch (None: all).
        seed: seeds every random draw (random supports, SpIEL's candidates), per layer.
        regrow_every: SpIEL: optimizer steps per prune/regrow cycle (candidate gradients accumulate over it).
        prune_fraction: SpIEL: fraction of the k slots pruned (smallest |Δ|) and regrown each cycle, in (0, 1].
        candidate_factor: SpIEL: candidate slots sampled per cycle, as a multiple of the slots regrown (>= 1).
        phase1: LT-SFT: the phase-1 fine-tuned weights: a model with the same module names (fine-tuned
            densely, or still patched with a larger ``SparseConfig``: its deltas are the change), or a dict
            ``{qualified module name (or name + '.weight'): weight}``; required unless the config is restored
            from a save. Not saved (the selected indices are).
        l0_weight: Diff Pruning: λ of the expected-L0 penalty ``λ · Σ P(z > 0)`` over every gate (> 0).
        temperature: Diff Pruning: β of the hard-concrete distribution, in (0, 1].
        gate_init: Diff Pruning: initial log α of every gate (large: gates open).
        final_density: Diff Pruning: fraction of each layer's k slots kept at the fixed-sparsity step (the
            largest |z·w|), in (0, 1].
        fix_at_step: Diff Pruning: the optimizer step at which the schedule fixes the gates to that
            sparsity (None: only when ``fix_gates`` is called).
        keep_fraction: GMT: fraction of the support's gradient entries kept each step (largest |g|), in (0, 1].
        nuclear_weight: SaRA: weight of the nuclear-norm penalty ``‖ΔW‖_*`` on each layer's delta (0: off, the
            default; it costs a dense out×in matrix and its SVD per layer and step).
        score_init: MFT: initial mask score (> 0: every mask open, the model unchanged at init).
        calib: SCT: calibration data: a dict of model inputs, a list of them, or a callable ``calib(model)``
            that runs the forwards itself. Not saved (the selected indices are).
        support: the initial support of "diff-pruning", "gmt" and "mft": "random", "magnitude" (largest
            |W|) or "smallest" (smallest |W|). Default "random" ("magnitude" for MFT).
        saved_support: True when the supports come from a save: the planner builds each layer with k slots
            at placeholder positions and ``fastft.load`` writes the saved indices; no selection runs (so no
            ``phase1`` / ``calib`` is needed). ``fastft.save`` writes the config with True.
    """

    method: str = "spiel"
    density: float = 0.005
    targets: Targets = ALL_LINEAR
    layers: Sequence[int] | None = None
    seed: int = 0
    regrow_every: int = 100
    prune_fraction: float = 0.1
    candidate_factor: float = 4.0
    phase1: Any = dataclasses.field(default=None, repr=False, compare=False)
    l0_weight: float = 1e-4
    temperature: float = 2.0 / 3.0
    gate_init: float = 3.0
    final_density: float = 0.5
    fix_at_step: int | None = None
    keep_fraction: float = 0.5
    score_init: float = 1.0
    nuclear_weight: float = 0.0
    calib: Any = dataclasses.field(default=None, repr=False, compare=False)
    support: str | None = None
    saved_support: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"SparseConfig.method={self.method!r}: choose one of {list(METHODS)}.")
        m = self.method
        self.density = float(check_number("SparseConfig.density", self.density, low=0.0, high=1.0, low_open=True,
                                          hint="the fraction of each weight that trains, e.g. 0.005."))
        self.targets = check_targets(self.targets)
        self.layers = check_layers(self.layers)
        self.seed = check_number("SparseConfig.seed", self.seed, integer=True)
        check_bool("SparseConfig.saved_support", self.saved_support)
        self._check_unused()
        self.regrow_every = check_number("SparseConfig.regrow_every", self.regrow_every, low=1, integer=True,
                                         hint="optimizer steps per SpIEL prune/regrow cycle.")
        for name in ("prune_fraction", "final_density", "keep_fraction"):
            setattr(self, name, float(check_number(f"SparseConfig.{name}", getattr(self, name), low=0.0, high=1.0,
                                                   low_open=True)))
        self.candidate_factor = float(check_number("SparseConfig.candidate_factor", self.candidate_factor, low=1.0,
                                                   hint="candidates per regrown slot (>= 1)."))
        self.l0_weight = float(check_number("SparseConfig.l0_weight", self.l0_weight, low=0.0, low_open=True))
        self.temperature = float(check_number("SparseConfig.temperature", self.temperature, low=0.0, high=1.0,
                                              low_open=True, hint="the hard-concrete β (Louizos et al.: 2/3)."))
        self.gate_init = float(check_number("SparseConfig.gate_init", self.gate_init))
        self.score_init = float(check_number("SparseConfig.score_init", self.score_init, low=0.0, low_open=True,
                                             hint="a positive score keeps every mask open at init."))
        self.nuclear_weight = float(check_number("SparseConfig.nuclear_weight", self.nuclear_weight, low=0.0,
                                                 hint="0 switches SaRA's nuclear-norm penalty off."))
        if self.fix_at_step is not None:
            self.fix_at_step = check_number("SparseConfig.fix_at_step", self.fix_at_step, low=1, integer=True,
                                            hint="or None to fix the gates by hand.")
        if self.support is None:
            self.support = "magnitude" if m == "mft" else "random" if m in OPTIONS["support"] else None
        elif self.support not in SUPPORTS:
            raise ValueError(f"SparseConfig.support={self.support!r}: choose one of {list(SUPPORTS)}.")
        if m == "lt-sft" and not self.saved_support and self.phase1 is None:
            raise ValueError(
                "SparseConfig(method='lt-sft') needs phase1=...: the phase-1 fine-tuned model (same module names) "
                "or a dict {module name: fine-tuned weight}; LT-SFT keeps the k most changed weights of it."
            )
        if self.phase1 is not None and not (isinstance(self.phase1, dict) or hasattr(self.phase1, "named_modules")):
            raise WrongType(
                f"SparseConfig.phase1: a {type(self.phase1).__name__}; pass the phase-1 fine-tuned model (nn.Module) "
                "or a dict {module name: weight tensor}."
            )
        if m == "sct" and not self.saved_support and self.calib is None:
            raise ValueError(
                "SparseConfig(method='sct') needs calib=...: a dict of model inputs, a list of them, or a callable "
                "calib(model) that runs the calibration forwards; SCT picks the input channels with the largest "
                "activations on it."
            )
        if self.calib is not None and not (callable(self.calib) or isinstance(self.calib, (dict, list, tuple))):
            raise WrongType(
                f"SparseConfig.calib: a {type(self.calib).__name__}; pass a dict of model inputs, a list of them, or "
                "a callable calib(model)."
            )

    def _check_unused(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, methods in OPTIONS.items():
            value = getattr(self, name)
            if self.method not in methods and value is not None and value != defaults[name]:
                raise ValueError(
                    f"SparseConfig.{name}={value!r} is used only by method {' / '.join(repr(x) for x in methods)}, "
                    f"not {self.method!r}; drop it."
                )

    @property
    def needs_schedule(self) -> bool:
        """Whether the method acts during training (SpIEL cycles, the Diff Pruning fixing step)."""
        return self.method == "spiel" or (self.method == "diff-pruning" and self.fix_at_step is not None)

    @property
    def has_regularization(self) -> bool:
        """Whether the layers add a loss term (Diff Pruning's L0 penalty, SaRA's nuclear norm)."""
        return self.method == "diff-pruning" or (self.method == "sara" and self.nuclear_weight > 0)

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name in ("phase1", "calib"):
                continue
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data


def _register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Known to ``config_from_dict`` under every method name (the saved dict's "method" is the field)."""
    for name in METHODS:
        if name in CONFIG_CLASSES:
            raise ValueError(f"config method name {name!r} is already registered")
        CONFIG_CLASSES[name] = cls
    return cls


_register(SparseConfig)
