"""``DSEEConfig``: LoRA plus a trained sparse delta of the weight, in one layer (DSEE)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import register_config, with_known_names
from .lora import LoRAConfig


@register_config
@with_known_names
@dataclass
class DSEEConfig(LoRAConfig):
    """DSEE (Chen et al. 2023, "DSEE: Dually Sparsity-embedded Efficient Tuning"): the update of each
    targeted weight is low-rank plus sparse, ``ΔW = s·BA + S`` with S holding ``sparse`` trained entries per
    layer at positions chosen once at patch time (see :class:`fastft.nn.DSEELinear`).

    Every :class:`fastft.LoRAConfig` field applies (init ``"default"`` / ``"gaussian"``, no DoRA), plus:

    Args:
        sparse: trained sparse entries per layer: a count ≥ 1 (the paper: 64) or a fraction in (0, 1) of
            the layer's out·in entries.
        support: where they go: ``"residual"`` (largest |W − W_r|, W_r the rank-r truncated SVD of W: the
            sparse part of a low-rank + sparse split of W, one SVD in place of the paper's GreBsmo),
            ``"magnitude"`` (largest |W|) or ``"random"`` (seeded by ``seed`` and the layer's shape).
        seed: seed of ``"random"``.
    """

    method: ClassVar[str] = "dsee"
    SUPPORTS: ClassVar[tuple[str, ...]] = ("residual", "magnitude", "random")

    sparse: float = 64
    support: str = "residual"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sparse, bool) or not isinstance(self.sparse, (int, float)) or self.sparse <= 0 or (
                isinstance(self.sparse, float) and self.sparse >= 1):
            raise ValueError(f"DSEEConfig.sparse={self.sparse!r}: a count >= 1 of trained entries per layer (e.g. 64) "
                             "or a fraction in (0, 1) of the layer's weights.")
        if self.support not in self.SUPPORTS:
            raise ValueError(f"DSEEConfig.support={self.support!r}: choose one of {list(self.SUPPORTS)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"DSEEConfig.seed={self.seed!r}: must be an integer.")
        if self.init not in ("default", "gaussian") or self.dora:
            raise ValueError(f"DSEEConfig: init={self.init!r}, dora={self.dora}: DSEE takes init 'default' or "
                             "'gaussian' and no DoRA.")

    def count(self, out_features: int, in_features: int) -> int:
        """Sparse entries for an out×in weight."""
        total = out_features * in_features
        k = max(1, round(self.sparse * total)) if isinstance(self.sparse, float) else int(self.sparse)
        if k > total:
            raise ValueError(f"DSEEConfig.sparse={self.sparse}: a {out_features}×{in_features} layer has only {total} "
                             "entries.")
        return k
