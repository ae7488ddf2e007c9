"""``SelectiveLoRAConfig``: LoRA whose blocks are switched on and off by learned indicator gates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import check_number, register_config, with_known_names
from .lora import LoRAConfig


@register_config
@with_known_names
@dataclass
class SelectiveLoRAConfig(LoRAConfig):
    """Selective LoRA ("Fine Tuning without Catastrophic Forgetting via Selective Low Rank Adaptation", 2025,
    building on TAPS): every LoRA block (one per targeted layer) has a learned importance score σ and an
    indicator gate ``I(σ ≥ threshold)``; the block's update is ``I(σ ≥ τ) · s·BA``. The indicator's gradient
    is passed straight through (STE: ∂I/∂σ = 1), and ``l1 · |σ|`` per block is added to the training loss
    (``fastft.regularization_loss``; added to ``output.loss`` automatically while training), so scores of
    blocks that do not help fall below τ and the block switches off. An inactive block computes nothing
    of its low-rank path: its forward is the base layer's, and it receives no gradient from the loss, so
    once off it stays off (the pruning is monotone).

    Every field of :class:`fastft.LoRAConfig` applies (init ``"default"`` / ``"gaussian"``, no DoRA, no
    dropout-free requirement), plus:

    Args:
        threshold: τ, the score at or above which a block is active (> 0).
        score_init: the scores' initial value (≥ threshold: every block starts active).
        l1: weight λ of the L1 penalty on the scores (≥ 0), per block.
    """

    method: ClassVar[str] = "selective_lora"

    threshold: float = 0.1
    score_init: float = 1.0
    l1: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("SelectiveLoRAConfig.threshold", self.threshold, low=0, low_open=True,
                     hint="the gate's threshold τ must be > 0 (e.g. 0.1).")
        check_number("SelectiveLoRAConfig.score_init", self.score_init, low=self.threshold,
                     hint="start the scores at or above threshold, so every block starts active.")
        check_number("SelectiveLoRAConfig.l1", self.l1, low=0, hint="a non-negative L1 weight.")
        if self.init not in ("default", "gaussian") or self.dora:
            raise ValueError(f"SelectiveLoRAConfig: init={self.init!r}, dora={self.dora}: gated blocks take init "
                             "'default' or 'gaussian' and no DoRA (a residual init's base would lose the update "
                             "when its gate closes).")
