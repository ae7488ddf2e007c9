"""Configuration objects: one small dataclass per method, validated when it is built.

A bad value raises ``ValueError`` at construction, naming the field and what to use instead, so a
mistake never reaches the model. Each config serialises to a JSON-able dict (``to_dict``) tagged with
its method name and back (``config_from_dict``), which is what ``fastft.save`` writes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence, Union

Targets = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


def _check_targets(targets: Any) -> Targets:
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(
                    f"targets={targets!r} is neither 'all-linear' nor a valid regular expression ({err}). "
                    "Pass a list of module-name suffixes such as ['q_proj', 'v_proj'] to match by name."
                ) from None
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return tuple(targets)
    raise ValueError(
        f"targets={targets!r}: use 'all-linear', a non-empty list of module-name suffixes "
        "(e.g. ['q_proj', 'down_proj']), or a regular expression over qualified module names."
    )


def _check_layers(layers: Any) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if isinstance(layers, range):
        layers = tuple(layers)
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise ValueError(f"layers={layers!r}: use None (all decoder layers) or a non-empty list of layer indices >= 0.")
    return tuple(sorted(set(layers)))


@dataclass
class MethodConfig:
    """Base of every method config: a method name and a JSON round trip."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"method": self.method, **data}


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank adaptation: ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with A (r×in), B (out×r).

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator (> 0); the scale is ``s = alpha / r``, or ``alpha / sqrt(r)`` with rslora.
        dropout: probability of zeroing an input of the low-rank path (PEFT's ``lora_dropout``), in [0, 1).
        targets: ``"all-linear"`` (every ``nn.Linear`` and bitsandbytes ``Linear4bit`` inside the decoder
            layers; never ``lm_head`` or embeddings), a list of module-name suffixes (``"q_proj"``,
            ``"self_attn.o_proj"``, ``"lm_head"``), or a regular expression matched in full against qualified
            module names (as PEFT does for a string).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        train_a: ``False`` keeps A frozen at its initialisation (asymmetric LoRA); only B trains, and the
            layer then saves only ``x Aᵀ`` for backward.
        init: ``"default"`` (PEFT's: A Kaiming-uniform with a=√5, B zero), ``"gaussian"`` (A ~ N(0, 1/r²),
            B zero) or ``"pissa"`` (A, B from the top-r singular triplets of W; the base weight becomes the
            residual ``W - s·BA``, so the model is unchanged at init).
        layers: indices of the decoder layers to touch (``None``: all). Modules outside the decoder stack
            (``lm_head``) are touched only when named in ``targets``.
    """

    method: ClassVar[str] = "lora"
    INITS: ClassVar[tuple[str, ...]] = ("default", "gaussian", "pissa")

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: Targets = ALL_LINEAR
    rslora: bool = False
    train_a: bool = True
    init: str = "default"
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r={self.r!r}: the rank must be a positive integer (e.g. 8, 16, 64).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: alpha must be a positive number (commonly 2*r).")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: dropout must be in [0, 1).")
        if self.init not in self.INITS:
            raise ValueError(f"LoRAConfig.init={self.init!r}: choose one of {list(self.INITS)}.")
        for name in ("rslora", "train_a"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r}: must be True or False.")
        self.targets = _check_targets(self.targets)
        self.layers = _check_layers(self.layers)
        self.dropout = float(self.dropout)

    @property
    def scale(self) -> float:
        """The factor s multiplying the low-rank product."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


CONFIG_CLASSES: dict[str, type[MethodConfig]] = {LoRAConfig.method: LoRAConfig}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild a config from :meth:`MethodConfig.to_dict` output."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ValueError(f"unknown fastft method {method!r} in saved config; known: {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"saved {cls.__name__} has fields this fastft does not know: {unknown}")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)


@dataclass
class S2FTConfig(MethodConfig):
    """Structured-sparse fine-tuning (S²FT): a few attention heads and FFN channels per layer train.

    Each decoder block is co-permuted (a permutation that leaves the model's function unchanged) so that
    the selected heads and channels come first, then only dense slices train: the first columns of
    ``o_proj`` (the selected heads) and of ``down_proj`` (the selected channels), and with ``rows=True``
    also the matching first rows of ``v_proj`` and ``up_proj``. See ``fastft.copermute`` for the
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
        if not isinstance(self.rows, bool):
            raise ValueError(f"S2FTConfig.rows={self.rows!r}: must be True or False.")
        if self.selection not in self.SELECTIONS:
            raise ValueError(f"S2FTConfig.selection={self.selection!r}: choose one of {list(self.SELECTIONS)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"S2FTConfig.seed={self.seed!r}: must be an integer.")
        self.layers = _check_layers(self.layers)
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


CONFIG_CLASSES[S2FTConfig.method] = S2FTConfig
