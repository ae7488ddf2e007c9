"""Configuration objects: one small dataclass per method, validated when it is built.

A bad value raises ``ValueError`` at construction, naming the field and what to use instead, so a
mistake never reaches the model. Each config serialises to a JSON-able dict (``to_dict``) tagged with
its method name and back (``config_from_dict``), which is what ``fastft.save`` writes.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence, Union

Targets = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


# ------------------------------------------------------------------------------------ value checks
class WrongType(TypeError, ValueError):
    """A value of the wrong type (a str for a number, 1 for a bool). Both a ``TypeError`` and, as every bad
    config value is, a ``ValueError``."""


def check_bool(what: str, value: Any) -> bool:
    """``value`` if it is a bool; a ``TypeError`` naming ``what`` otherwise (no truthy stand-ins: 'no', 1)."""
    if not isinstance(value, bool):
        raise WrongType(f"{what}={value!r}: must be True or False (a bool, not {type(value).__name__}).")
    return value


def check_number(
    what: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> float | int:
    """``value`` if it is a finite real number (an int when ``integer``) inside the given bounds.

    A bool, a string or a tensor is a ``TypeError``; NaN, ±inf or a value out of range a ``ValueError``.
    Every message names ``what``, the value and the accepted range, plus ``hint``.
    """
    kinds = "an integer" if integer else "a number"
    bounds = ""
    if low is not None or high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        bounds = f" in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    tail = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise WrongType(f"{what}={value!r}: must be {kinds}{bounds}, not a {type(value).__name__}.{tail}")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{what}={value!r}: must be a finite number{bounds}.{tail}")
    bad = (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        raise ValueError(f"{what}={value!r}: must be {kinds}{bounds}.{tail}")
    return int(value) if integer else value


# PEFT's names for fastft's config fields: a PEFT habit gets told the fastft name instead of a bare TypeError
PEFT_NAMES = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "init_lora_weights": "init",
    "layers_to_transform": "layers",
}


def _with_known_names(cls: type) -> type:
    """Wrap a dataclass ``__init__`` so an unknown keyword names the fields (and PEFT's spelling of them)."""
    init = cls.__init__
    fields = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            renames = [f"{k}= is {PEFT_NAMES[k]}=" for k in unknown if PEFT_NAMES.get(k) in fields]
            hint = f" (PEFT's names: {'; '.join(renames)} in fastft)" if renames else ""
            raise TypeError(f"{cls.__name__} has no argument(s) {unknown}{hint}; its arguments are {fields}.")
        if len(args) > len(fields):
            raise TypeError(f"{cls.__name__} takes at most {len(fields)} arguments ({fields}), got {len(args)}.")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return cls


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


def _check_modules_to_save(value: Any) -> Union[str, tuple[str, ...]]:
    if value == "auto":
        return "auto"
    if value is None:
        return ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(
        f"LoRAConfig.modules_to_save={value!r}: use 'auto' (the task head of a classification / QA model), "
        "a list of module-name suffixes trained in full (e.g. ['classifier']), or () for none."
    )


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


@_with_known_names
@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank adaptation: ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with A (r×in), B (out×r).

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator (> 0); the scale is ``s = alpha / r``, or ``alpha / sqrt(r)`` with rslora.
        dropout: probability of zeroing an input of the low-rank path (PEFT's ``lora_dropout``), in [0, 1).
        targets: ``"all-linear"`` (every ``nn.Linear`` and bitsandbytes ``Linear4bit`` inside the decoder
            layers, or a BERT-style model's encoder layers; never ``lm_head``, embeddings, a pooler or a head), a list of module-name suffixes (``"q_proj"``,
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
        modules_to_save: modules trained in full beside the adapters (PEFT's ``modules_to_save``): their own
            parameters stay trainable, ``fastft.save`` / ``export_peft`` write them, ``unpatch(merge=False)``
            restores their original values. ``"auto"`` (default): the task head of a
            ``*ForSequenceClassification`` / ``*ForTokenClassification`` / ``*ForMultipleChoice`` /
            ``*ForQuestionAnswering`` model (its top-level ``classifier``, ``score`` or ``qa_outputs``, as PEFT's
            task types do), nothing on other models; a list of module-name suffixes names them; ``()`` trains none.
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
    modules_to_save: Any = "auto"

    def __post_init__(self) -> None:
        self.r = check_number("LoRAConfig.r", self.r, low=1, integer=True,
                              hint="the rank must be a positive integer (e.g. 8, 16, 64).")
        check_number("LoRAConfig.alpha", self.alpha, low=0, low_open=True,
                     hint="alpha must be a positive number (commonly 2*r).")
        self.dropout = check_number("LoRAConfig.dropout", self.dropout, low=0.0, high=1.0, high_open=True,
                                    hint="dropout must be in [0, 1).")
        if not isinstance(self.init, str) or self.init not in self.INITS:
            raise ValueError(f"LoRAConfig.init={self.init!r}: choose one of {list(self.INITS)}.")
        for name in ("rslora", "train_a", "dora", "dora_detach_norm"):
            check_bool(f"LoRAConfig.{name}", getattr(self, name))
        if not self.dora_detach_norm and not self.dora:
            raise ValueError(
                "LoRAConfig.dora_detach_norm=False only applies to DoRA: set dora=True as well, or leave "
                "dora_detach_norm at its default."
            )
        self.targets = _check_targets(self.targets)
        self.layers = _check_layers(self.layers)
        self.dropout = float(self.dropout)
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)

    @property
    def scale(self) -> float:
        """The factor s multiplying the low-rank product."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


ROTATIONS = ("r1", "r2", "r3", "r4")


def _check_bits(name: str, value: Any, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        none = " or None (not quantized)" if optional else ""
        raise ValueError(f"QATConfig.{name}={value!r}: use an integer number of bits from 2 to 8{none}.")
    return value


def _check_layer_list(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise ValueError(f"QATConfig.rotations[{name!r}]={value!r}: give the decoder-layer indices that keep it.")
    if isinstance(value, (list, tuple, range)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        return tuple(sorted(set(value)))
    raise ValueError(f"QATConfig.rotations[{name!r}]={value!r}: give a list of decoder-layer indices (>= 0).")


def _check_rotations(rotations: Any) -> Union[str, tuple[str, ...], dict[str, Any]]:
    if rotations == "adaptive":
        return "adaptive"
    if isinstance(rotations, dict):
        unknown = sorted(set(rotations) - set(ROTATIONS))
        if unknown:
            raise ValueError(f"QATConfig.rotations has unknown keys {unknown}; the keys are {list(ROTATIONS)}.")
        resolved: dict[str, Any] = {}
        for name in ROTATIONS:
            value = rotations.get(name, False if name in ("r1", "r2") else ())
            if name in ("r1", "r2"):
                if not isinstance(value, bool):
                    raise ValueError(f"QATConfig.rotations[{name!r}]={value!r}: True or False (it is folded into every layer).")
                resolved[name] = value
            else:
                resolved[name] = _check_layer_list(name, value)
        return resolved
    if isinstance(rotations, str):
        rotations = (rotations,)
    if isinstance(rotations, (list, tuple)) and all(isinstance(r, str) for r in rotations):
        unknown = [r for r in rotations if r not in ROTATIONS]
        if not unknown and len(set(rotations)) == len(rotations):
            return tuple(r for r in ROTATIONS if r in rotations)
    raise ValueError(
        f"QATConfig.rotations={rotations!r}: use a subset of {ROTATIONS} without repeats (e.g. ('r1', 'r2')), "
        "() for none, 'adaptive' (R1 and R2 folded, R3/R4 kept per layer where they lower the quantization "
        "error on calib), or the per-layer form {'r1': True, 'r2': True, 'r3': [layer indices], 'r4': [...]}."
    )


def _check_calib(calib: Any) -> Any:
    import torch

    ids = calib.get("input_ids") if isinstance(calib, dict) else calib
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not ids.is_complex() and ids.ndim in (1, 2) and ids.numel():
        return calib
    raise ValueError(
        "QATConfig.calib must be a calibration batch of token ids: an integer tensor (batch x seq, or seq) or a "
        "dict of model inputs with 'input_ids' (e.g. a tokenizer's output), on the model's device."
    )


@_with_known_names
@dataclass
class QATConfig(MethodConfig):
    """Quantization-aware training: straight-through fake quantization plus Hadamard rotations (RoSTE).

    Every linear layer inside the decoder layers becomes a :class:`fastft.nn.QuantLinear`:
    ``y = Q_a(x) · Q_w(W)ᵀ + b`` with ``Q`` the fake quantizer of ``fastft.ops.fake_quantize`` (round to the
    integer grid and back; the backward is the straight-through estimator). Alone, QAT trains those
    weights (RoSTE's quantization-aware fine-tuning); with a :class:`LoRAConfig` in the same ``patch`` call
    the base is frozen and ``Q_w`` quantizes the merged weight ``W + s·BA``, so what trains is what
    :func:`fastft.export_quantized` writes.

    Args:
        w_bits: weight bits, 2..8.
        a_bits: bits of the activations entering each linear layer (``None``: not quantized).
        kv_bits: bits of the keys and values inside attention (``None``: not quantized).
        w_granularity: ``"channel"`` (one scale per output row) or ``"group"`` (``group_size`` consecutive
            inputs of a row share a scale).
        group_size: the group length for ``"group"`` granularities; it must divide the input width of every
            quantized layer (checked when patching, before anything changes).
        a_granularity: ``"token"`` (one scale per token) or ``"group"`` (per token, in groups of ``group_size``).
        symmetric: symmetric (``q·s``) instead of asymmetric (``(q - z)·s``) grids, for weights, activations and KV.
        clip_ratio: in (0, 1]; the grid covers ``clip_ratio`` times the observed range.
        ste: ``"identity"`` (the gradient passes unchanged) or ``"clipped"`` (zero where the value was clamped).
        rotations: which rotations (QuaRot / SpinQuant layout) to use:
            ``"r1"`` a seeded random Hadamard over the hidden size folded into the embeddings, every linear
            layer reading or writing the residual stream and ``lm_head`` (after each RMSNorm's scale is folded
            into the layers that follow it); ``"r2"`` a per-head Hadamard folded into ``v_proj``'s output and
            ``o_proj``'s input; ``"r3"`` an online Hadamard on queries and keys after the rotary embedding
            (it only matters for quantized keys: without ``kv_bits`` it is skipped, and the report says so);
            ``"r4"`` an online Hadamard on ``down_proj``'s input, its inverse folded into ``down_proj``.
            ``()`` for none; ``"adaptive"``: R1 and R2, and per layer R3 / R4 only where they lower the
            quantization error measured on ``calib`` (RoSTE); or the per-layer form that ``"adaptive"``
            resolves to, ``{"r1": True, "r2": True, "r3": [layer indices], "r4": [layer indices]}``.
        calib: the calibration batch for ``"adaptive"`` (token ids, or a dict of model inputs). Not saved:
            saved configs hold the per-layer choice instead.
        seed: seed of R1's random signs.
    """

    method: ClassVar[str] = "qat"
    W_GRANULARITIES: ClassVar[tuple[str, ...]] = ("channel", "group")
    A_GRANULARITIES: ClassVar[tuple[str, ...]] = ("token", "group")
    STES: ClassVar[tuple[str, ...]] = ("identity", "clipped")

    w_bits: int = 4
    a_bits: int | None = 8
    kv_bits: int | None = None
    w_granularity: str = "channel"
    group_size: int = 128
    a_granularity: str = "token"
    symmetric: bool = False
    clip_ratio: float = 1.0
    ste: str = "identity"
    rotations: Any = ROTATIONS
    calib: Any = dataclasses.field(default=None, compare=False, repr=False)
    seed: int = 0

    def __post_init__(self) -> None:
        self.w_bits = _check_bits("w_bits", self.w_bits, optional=False)
        self.a_bits = _check_bits("a_bits", self.a_bits, optional=True)
        self.kv_bits = _check_bits("kv_bits", self.kv_bits, optional=True)
        if self.w_granularity not in self.W_GRANULARITIES:
            raise ValueError(f"QATConfig.w_granularity={self.w_granularity!r}: choose one of {list(self.W_GRANULARITIES)}.")
        if self.a_granularity not in self.A_GRANULARITIES:
            raise ValueError(f"QATConfig.a_granularity={self.a_granularity!r}: choose one of {list(self.A_GRANULARITIES)}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"QATConfig.group_size={self.group_size!r}: a positive integer (e.g. 32, 64, 128).")
        check_bool("QATConfig.symmetric", self.symmetric)
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) or not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"QATConfig.clip_ratio={self.clip_ratio!r}: a number in (0, 1] (1.0: no clipping).")
        self.clip_ratio = float(self.clip_ratio)
        if self.ste not in self.STES:
            raise ValueError(f"QATConfig.ste={self.ste!r}: choose one of {list(self.STES)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"QATConfig.seed={self.seed!r}: an integer.")
        self.rotations = _check_rotations(self.rotations)
        if self.rotations == "adaptive":
            if self.calib is None:
                raise ValueError(
                    "QATConfig(rotations='adaptive') needs calib: a batch of token ids (or a dict of model inputs) "
                    "on which each layer's quantization error is measured with and without R3 / R4."
                )
            self.calib = _check_calib(self.calib)
        elif self.calib is not None:
            raise ValueError("QATConfig.calib is used only with rotations='adaptive'; drop it or set rotations='adaptive'.")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["calib"] = None  # a tensor; the saved form of 'adaptive' is its per-layer choice
        if isinstance(self.rotations, dict):
            data["rotations"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rotations.items()}
        return data


CONFIG_CLASSES: dict[str, type[MethodConfig]] = {LoRAConfig.method: LoRAConfig}
CONFIG_CLASSES[QATConfig.method] = QATConfig


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


@_with_known_names
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
        check_number("LossConfig.z_loss", self.z_loss, low=0.0, hint="e.g. 1e-4; 0 for none.")
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


@_with_known_names
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
