"""``LoFiTConfig``: LoFiT, per-head offset vectors on a few selected attention heads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from .checks import MethodConfig, check_layers, check_number, register_config, with_known_names


def _is_batch(value: Any) -> bool:
    return callable(value) or isinstance(value, dict)


@register_config
@with_known_names
@dataclass
class LoFiTConfig(MethodConfig):
    """LoFiT (Yin et al. 2024): select a few attention heads, then train an offset vector per selected head,
    added to that head's attention output (the input of the output projection, per query head).

    Step 1 (selection, at patch time, skipped when ``selected`` is given): every query head gets a trainable
    scaling vector ``a`` (head_dim, starting at 0), its output becomes ``(1 + a) ⊙ z``; ``select_steps`` Adam
    steps (lr ``select_lr``) on the loss of ``calib`` plus ``l1 · Σ |a|`` train only these vectors; the heads
    with the largest ``‖a‖₁`` over the whole model are selected. The model is left exactly as it was.
    Step 2 (training): each selected head gets an offset ``v`` (head_dim, starting at 0): ``z ← z + v``. Only
    the offsets train. See :class:`fastft.nn.LoFiTLinear`.

    Args:
        heads: how many query heads to select, over all layers: a fraction in (0, 1) of them (the paper: 3%–10%;
            ``max(1, round(heads · total))``) or a count ≥ 1.
        targets: module-name suffix of the attention output projection whose input holds the heads' outputs
            (``"o_proj"``: Llama, Qwen2, Mistral, Gemma).
        layers: decoder layer indices allowed (``None``: all).
        calib: the selection data: a dict of model inputs whose forward returns a loss (include ``labels``), a
            callable ``calib(model) -> scalar loss``, or a list of either (one selection step per item, cycled).
            Required unless ``selected`` is given; not saved.
        select_steps: optimizer steps of the selection (≥ 1).
        select_lr: Adam learning rate of the selection (> 0).
        l1: weight of the L1 penalty on the scaling vectors (≥ 0).
        selected: the selection itself, ``{layer index: [head indices]}``; what ``fastft.save`` writes, so
            ``fastft.load`` reproduces it without ``calib``.
    """

    method: ClassVar[str] = "lofit"

    heads: float = 0.03
    targets: str = "o_proj"
    layers: Sequence[int] | None = None
    calib: Any = dataclasses.field(default=None, repr=False, compare=False)
    select_steps: int = 10
    select_lr: float = 1e-2
    l1: float = 1e-3
    selected: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, float)) or self.heads <= 0 or (
                isinstance(self.heads, float) and self.heads >= 1):
            raise ValueError(f"LoFiTConfig.heads={self.heads!r}: a fraction in (0, 1) of all query heads (e.g. 0.03) "
                             "or an integer count >= 1.")
        if not isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoFiTConfig.targets={self.targets!r}: the name suffix of the attention output "
                             "projection, e.g. 'o_proj'.")
        self.layers = check_layers(self.layers)
        self.select_steps = check_number("LoFiTConfig.select_steps", self.select_steps, low=1, integer=True,
                                         hint="the number of selection steps, e.g. 10.")
        check_number("LoFiTConfig.select_lr", self.select_lr, low=0, low_open=True, hint="a positive learning rate.")
        check_number("LoFiTConfig.l1", self.l1, low=0, hint="a non-negative L1 weight.")
        self.selected = self._check_selected(self.selected)
        if self.calib is not None:
            items = self.calib if isinstance(self.calib, (list, tuple)) else [self.calib]
            if not items or not all(map(_is_batch, items)):
                raise ValueError(f"LoFiTConfig.calib: got {type(self.calib).__name__}; pass a dict of model inputs "
                                 "with labels, a callable model -> loss, or a non-empty list of either.")
        if self.calib is None and self.selected is None:
            raise ValueError("LoFiTConfig needs calib=... (a dict of model inputs with labels, a callable "
                             "model -> loss, or a list of either) to select heads, or selected={layer: [heads]}.")
        if self.calib is not None and self.selected is not None:
            raise ValueError("LoFiTConfig: give calib (to select heads) or selected (a selection), not both.")

    @staticmethod
    def _check_selected(selected: Any) -> dict[int, tuple[int, ...]] | None:
        if selected is None:
            return None
        problem = "LoFiTConfig.selected: use {layer index: [head indices]} with at least one head"
        if not isinstance(selected, dict) or not selected:
            raise ValueError(f"{problem}; got {selected!r}.")
        clean = {}
        for layer, heads in selected.items():
            try:
                index = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"{problem}; the key {layer!r} is not a layer index.") from None
            if (not isinstance(heads, (list, tuple)) or not heads or len(set(heads)) != len(heads)
                    or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads)):
                raise ValueError(f"{problem}; layer {layer} has {heads!r} (distinct non-negative integers).")
            clean[index] = tuple(sorted(heads))
        return dict(sorted(clean.items()))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["calib"] = None
        if self.selected is not None:
            data["selected"] = {str(k): list(v) for k, v in self.selected.items()}
        return data
