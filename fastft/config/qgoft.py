"""``QGOFTConfig``: quasi-Givens orthogonal fine-tuning (qGOFT) of linear layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

from .checks import (
    ALL_LINEAR,
    MethodConfig,
    Targets,
    check_bool,
    check_layers,
    check_number,
    check_targets,
    register_config,
    with_known_names,
)


@register_config
@with_known_names
@dataclass
class QGOFTConfig(MethodConfig):
    """qGOFT (Ma et al., ICML 2024): ``y = (x Mᵀ) Wᵀ + b`` with M a butterfly of quasi-Givens 2×2 blocks.

    M = B_{S-1} ⋯ B_0 over the input features (zero-padded to a power of two P), stage s pairing features
    (i, i + 2^s); each block is a Givens rotation by θ with, optionally, norm adjustments α_u, α_v and a
    relative angle adjustment δ, under the soft orthogonality term ``λ Σ ‖BᵀB − I‖²_F`` that training adds to
    the loss. Identity at init. See :class:`fastft.nn.QGOFTLinear` and docs/methods/qgoft.md.

    Args:
        targets: ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` in the decoder layers), a list of module-name
            suffixes or a regular expression (as :class:`fastft.LoRAConfig`). 4-bit layers are refused.
        layers: decoder layer indices to touch (None: all).
        stages: butterfly stages S per layer (an int >= 1, at most log2 P of each targeted layer); None: log2 P,
            so every input feature mixes with every other.
        learn_scale: train the norm adjustments (2 per block).
        relative_angle: train the relative angle adjustments (1 per block).
        orthogonality_weight: λ >= 0 of the soft orthogonality regularizer (0: none). Ignored (no term) when
            neither adjustment trains: the blocks are exact rotations.
    """

    method: ClassVar[str] = "qgoft"

    targets: Targets = ALL_LINEAR
    layers: Sequence[int] | None = None
    stages: Optional[int] = None
    learn_scale: bool = True
    relative_angle: bool = True
    orthogonality_weight: float = 1e-3

    def __post_init__(self) -> None:
        self.targets = check_targets(self.targets)
        self.layers = check_layers(self.layers)
        if self.stages is not None:
            self.stages = check_number("QGOFTConfig.stages", self.stages, low=1, integer=True,
                                       hint="the number of butterfly stages (None: log2 of the padded width).")
        check_bool("QGOFTConfig.learn_scale", self.learn_scale)
        check_bool("QGOFTConfig.relative_angle", self.relative_angle)
        self.orthogonality_weight = float(check_number(
            "QGOFTConfig.orthogonality_weight", self.orthogonality_weight, low=0.0,
            hint="the weight λ of the soft orthogonality term (0 switches it off)."))
