"""``S2FTConfig``: structured-sparse fine-tuning of selected rows/columns with partial backprop."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from .checks import (
    MethodConfig,
    check_bool,
    check_layers,
    register_config,
    with_known_names,
)


@register_config
@with_known_names
@dataclass
class S2FTConfig(MethodConfig):
    """Structured-sparse fine-tuning (S²FT): a few attention heads and FFN channels per layer train.

    Each decoder block is co-permuted (a permutation that leaves the model's function unchanged) so that
    the selected heads and channels come first, then only dense slices train: the first columns of
    ``o_proj`` (the selected heads) and of ``down_proj`` (the selected channels), and with ``rows=True``
    also the matching first rows of ``v_proj`` and ``up_proj``. See ``fastft.plans.s2ft_copermute`` for the
    permutation rules and ``fastft.nn.S2FTLinear`` for the layer.

    Args:
        ffn_ratio: fraction of each layer's FFN channels that train, in (0, 1]; 0 switches the FFN part
            off. The count is ``max(1, round(ffn_ratio · intermediate_size))``.
        attn_ratio: fraction of each layer's query heads that train, in (0, 1]; 0 (the default) switches
            the attention part off. The count is ``max(1, round(attn_ratio · num_heads))``. With
            grouped-query attention (r query heads per key/value head) a permutation can only move query
            heads together with their key/value head, so the selection fills whole groups with at most
            one partial group; choose a ratio giving a multiple of r to train whole groups. With
            ``rows=True`` the v_proj rows of every key/value head serving a selected query head train.
        targets: which parts may train: ``"o_proj"`` (attention heads) and/or ``"down_proj"`` (FFN
            channels). A part trains when it is listed and its ratio is > 0; a ratio > 0 for a part that
            is not listed is an error.
        rows: also train the matching rows of ``v_proj`` (attention) and ``up_proj`` (FFN).
        selection: how heads/channels are chosen, per layer: ``"random"`` (seeded by ``seed`` and the
            layer index), ``"weight_norm"`` (largest squared norm of the weights that would train: the
            head's o_proj columns, the channel's down_proj column, plus the matching v_proj/up_proj rows
            with ``rows=True``), or ``"gradient"`` (largest squared norm of the gradient of those weights
            from one backward pass on ``calib``; the model is left exactly as it was).
        seed: seed of ``"random"`` selection.
        layers: indices of the decoder layers to touch (``None``: all).
        calib: the probe for ``selection="gradient"``, required by it and refused by the others: either a
            dict of model inputs whose forward returns a loss (``model(**calib).loss``, so include
            ``labels``), or a callable ``calib(model) -> scalar loss tensor``. It is not saved.
        indices: an explicit selection, ``{layer: {"attn": [query heads], "ffn": [channels]}}`` in slot
            order, for every touched layer and every active part, with as many entries as the ratios
            give. When given, no selection policy runs (``fastft.save`` records the selection this way,
            so ``fastft.load`` reproduces it without ``calib``).
    """

    method: ClassVar[str] = "s2ft"
    SELECTIONS: ClassVar[tuple[str, ...]] = ("random", "weight_norm", "gradient")
    PARTS: ClassVar[dict[str, str]] = {"o_proj": "attn", "down_proj": "ffn"}

    ffn_ratio: float = 0.02
    attn_ratio: float = 0.0
    targets: Sequence[str] = ("o_proj", "down_proj")
    rows: bool = False
    selection: str = "random"
    seed: int = 0
    layers: Sequence[int] | None = None
    calib: Any = dataclasses.field(default=None, repr=False, compare=False)
    indices: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name, what in (("ffn_ratio", "FFN channels"), ("attn_ratio", "attention heads")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"S2FTConfig.{name}={value!r}: the fraction of each layer's {what} that train, in (0, 1] "
                    "(0 switches that part off)."
                )
            setattr(self, name, float(value))
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"S2FTConfig.targets={self.targets!r}: use a non-empty list from {list(self.PARTS)}.")
        for target in self.targets:
            if not isinstance(target, str) or target.rsplit(".", 1)[-1] not in self.PARTS:
                raise ValueError(
                    f"S2FTConfig.targets: {target!r} is not an S²FT target. S²FT trains column slices of 'o_proj' "
                    "(attention heads) and 'down_proj' (FFN channels); rows=True adds the matching rows of v_proj "
                    "and up_proj."
                )
        self.targets = tuple(self.targets)
        listed = {self.PARTS[t.rsplit(".", 1)[-1]] for t in self.targets}
        for ratio, part, target in ((self.attn_ratio, "attn", "o_proj"), (self.ffn_ratio, "ffn", "down_proj")):
            if ratio > 0 and part not in listed:
                raise ValueError(
                    f"S2FTConfig.{part}_ratio={ratio} but {target!r} is not in targets={list(self.targets)}: "
                    f"add it or set {part}_ratio=0."
                )
        if not self.parts:
            raise ValueError("S2FTConfig: nothing would train; set ffn_ratio and/or attn_ratio above 0.")
        check_bool("S2FTConfig.rows", self.rows)
        if self.selection not in self.SELECTIONS:
            raise ValueError(f"S2FTConfig.selection={self.selection!r}: choose one of {list(self.SELECTIONS)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"S2FTConfig.seed={self.seed!r}: must be an integer.")
        self.layers = check_layers(self.layers)
        self.indices = self._check_indices(self.indices)
        if self.calib is not None and not (callable(self.calib) or isinstance(self.calib, dict)):
            raise ValueError(
                f"S2FTConfig.calib: a {type(self.calib).__name__}; pass a dict of model inputs (with labels) or a "
                "callable model -> loss."
            )
        if self.selection == "gradient" and self.calib is None and self.indices is None:
            raise ValueError(
                "S2FTConfig(selection='gradient') needs calib=...: a dict of model inputs with labels "
                "(model(**calib).loss is back-propagated once) or a callable model -> scalar loss."
            )
        if self.selection != "gradient" and self.calib is not None:
            raise ValueError(
                f"S2FTConfig.calib is used only by selection='gradient', not {self.selection!r}; drop it."
            )

    @property
    def parts(self) -> tuple[str, ...]:
        """The active parts: "attn" and/or "ffn"."""
        listed = {self.PARTS[t.rsplit(".", 1)[-1]] for t in self.targets}
        ratios = {"attn": self.attn_ratio, "ffn": self.ffn_ratio}
        return tuple(p for p in ("attn", "ffn") if p in listed and ratios[p] > 0)

    def _check_indices(self, indices: Any) -> dict[int, dict[str, tuple[int, ...]]] | None:
        if indices is None:
            return None
        problem = (
            f"S2FTConfig.indices: use {{layer: {{'attn': [heads], 'ffn': [channels]}}}} with an entry for each "
            f"active part {list(self.parts)}"
        )
        if not isinstance(indices, dict) or not indices:
            raise ValueError(f"{problem}; got {type(indices).__name__}.")
        clean: dict[int, dict[str, tuple[int, ...]]] = {}
        for layer, parts in indices.items():
            try:
                layer_index = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"{problem}; layer key {layer!r} is not an integer.") from None
            if not isinstance(parts, dict) or set(parts) != set(self.parts):
                raise ValueError(f"{problem}; layer {layer_index} has {parts!r}.")
            clean[layer_index] = {}
            for part, values in parts.items():
                if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in values
                ):
                    raise ValueError(f"{problem}; layer {layer_index} {part!r} is {values!r}, not a list of integers.")
                clean[layer_index][part] = tuple(values)
        return dict(sorted(clean.items()))

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name == "calib":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            if f.name == "indices" and value is not None:
                value = {str(layer): {part: list(v) for part, v in parts.items()} for layer, parts in value.items()}
            data[f.name] = value
        return data
