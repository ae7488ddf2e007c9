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
        dora: weight-decomposed LoRA (DoRA; QDoRA over a 4-bit base): ``y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``
            with ``g = m / ‖W + s·BA‖`` per output row and m a trainable magnitude vector
            (``lora_magnitude_vector``), initialised to the row norms so DoRA equals LoRA at init. See
            :class:`fastft.nn.DoRALinear`.
        dora_detach_norm: with ``dora``, treat the row norm as a constant in backward (the DoRA paper's
            section 4.3, and PEFT's behaviour; the default). ``False`` gives the exact gradient through the
            norm to A and B, at the cost of one more out×in×r product in backward.
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
    dora: bool = False
    dora_detach_norm: bool = True

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
        for name in ("dora", "dora_detach_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r}: must be True or False.")
        if not self.dora_detach_norm and not self.dora:
            raise ValueError(
                "LoRAConfig.dora_detach_norm=False only applies to DoRA: set dora=True as well, or leave "
                "dora_detach_norm at its default."
            )
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
