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
class LossConfig(MethodConfig):
    """Fused linear cross-entropy on a ``*ForCausalLM``: the loss without the tokens × vocabulary logits.

    After ``fastft.patch(model, LossConfig(...))`` the model's forward, when given ``labels``, computes the
    loss with :func:`fastft.ops.linear_cross_entropy` straight from the last hidden states and lm_head's
    weight (labels shifted exactly as transformers does; ``shift_labels`` and ``num_items_in_batch``
    honoured). Logits are returned only when asked: ``return_logits=True`` in the call, or by default
    when the model is in eval mode (``model.eval()``); in train mode ``outputs.logits`` is None.

    Args:
        kind: ``"ce"`` (cross-entropy), ``"dft"`` (each token weighted by sg(p_t)) or ``"talr"``
            (weighted by max(sg(p_t)^(1/τ), talr_min_weight), τ the median over the batch's rows of their
            mean NLL, computed per forward call: under gradient accumulation, per micro-batch; so only
            "ce" and "dft" accumulate to exactly the whole batch's gradient).
        chunk_size: tokens per chunk of the PyTorch reference (None: automatic); the Triton kernel ignores it.
        ignore_index: label value that marks positions without a target (transformers' -100; Trainer
            counts ``num_items_in_batch`` with -100 whatever this is).
        label_smoothing: ε in [0, 1], as in ``torch.nn.functional.cross_entropy``.
        z_loss: λ ≥ 0 of the auxiliary ``λ · logsumexp(z)²`` per token (PaLM's z-loss; 1e-4 is common).
        logit_softcap: c > 0 for ``z ← c·tanh(z/c)``. None: the model's own ``final_logit_softcapping``
            if its config has one (Gemma 2), else no cap. A value different from the model's own is refused.
        talr_min_weight: w_min in [0, 1] of TALR.
    """

    method: ClassVar[str] = "loss"
    KINDS: ClassVar[tuple[str, ...]] = ("ce", "dft", "talr")

    kind: str = "ce"
    chunk_size: int | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    talr_min_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"LossConfig.kind={self.kind!r}: choose one of {list(self.KINDS)}.")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"LossConfig.chunk_size={self.chunk_size!r}: use None (automatic) or a positive integer.")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"LossConfig.ignore_index={self.ignore_index!r}: must be an integer (transformers uses -100).")
        for name, low, high in (("label_smoothing", 0.0, 1.0), ("talr_min_weight", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"LossConfig.{name}={value!r}: must be a number in [{low}, {high}].")
            setattr(self, name, float(value))
        if isinstance(self.z_loss, bool) or not isinstance(self.z_loss, (int, float)) or not self.z_loss >= 0:
            raise ValueError(f"LossConfig.z_loss={self.z_loss!r}: must be a number >= 0 (e.g. 1e-4), 0 for none.")
        self.z_loss = float(self.z_loss)
        if self.logit_softcap is not None:
            if (isinstance(self.logit_softcap, bool) or not isinstance(self.logit_softcap, (int, float))
                    or not self.logit_softcap > 0 or math.isinf(self.logit_softcap)):
                raise ValueError(
                    f"LossConfig.logit_softcap={self.logit_softcap!r}: use None (the model's own, if any) or a "
                    "positive number (Gemma 2 uses 30.0)."
                )
            self.logit_softcap = float(self.logit_softcap)


CONFIG_CLASSES[LossConfig.method] = LossConfig
