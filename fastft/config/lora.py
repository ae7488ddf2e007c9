"""``LoRAConfig``: LoRA, DoRA, rsLoRA, PiSSA and the low-rank family on linear layers."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence, Union

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


def _is_tensor(value: Any) -> bool:
    import torch  # configs import torch only where a value must be a tensor (as QATConfig.calib)

    return isinstance(value, torch.Tensor)


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


@register_config
@with_known_names
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
            B zero), ``"pissa"`` (A, B from the top-r singular triplets of W; the base weight becomes the
            residual ``W - s·BA``, so the model is unchanged at init), ``"corda"`` (CorDA: A, B from the SVD of
            W times the covariance of the layer's inputs on ``calib``, the components ``corda_mode`` names;
            residual base as PiSSA) or ``"loldu"`` (LoLDU: ``W = P L D U``; A, B from the first r columns of PL
            and rows of U, both frozen, and only the diagonal d trains: ``y = x W_resᵀ + s·((x Aᵀ) ⊙ d) Bᵀ``,
            see :class:`fastft.nn.LoLDULinear`).
        corda_mode: with ``init="corda"``: ``"kpm"`` (knowledge-preserved: the adapter starts from the r
            smallest components, the largest stay frozen in the residual) or ``"ipm"`` (instruction-previewed:
            from the r largest). Ignored by the other inits (must stay at its default).
        calib: with ``init="corda"``: the calibration data whose activations give each layer's input
            covariance: a tensor of token ids (batch×seq), a dict of model inputs, a list of either, or a
            callable ``calib(model)`` that runs the model. Not saved; ``fastft.save`` writes ``"saved"``,
            which tells ``fastft.load`` that the factors come from the saved adapter.
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
    INITS: ClassVar[tuple[str, ...]] = ("default", "gaussian", "pissa", "corda", "loldu")
    # inits whose base weight holds a residual W - s·(initial update): undone on unpatch(merge=False)
    RESIDUAL_INITS: ClassVar[tuple[str, ...]] = ("pissa", "corda", "loldu")

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
    corda_mode: str = "kpm"
    calib: Any = dataclasses.field(default=None, compare=False, repr=False)

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
        if self.init == "loldu" and (self.dora or self.dropout):
            raise ValueError("LoRAConfig(init='loldu') trains only the diagonal between frozen LDU factors; it is not "
                             "combined with dora=True or dropout > 0 here. Leave both at their defaults.")
        if not self.dora_detach_norm and not self.dora:
            raise ValueError(
                "LoRAConfig.dora_detach_norm=False only applies to DoRA: set dora=True as well, or leave "
                "dora_detach_norm at its default."
            )
        self.targets = check_targets(self.targets)
        self.layers = check_layers(self.layers)
        self.dropout = float(self.dropout)
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)
        self._check_variants()

    def _check_variants(self) -> None:
        if self.corda_mode not in ("kpm", "ipm"):
            raise ValueError(f"LoRAConfig.corda_mode={self.corda_mode!r}: choose 'kpm' (knowledge-preserved: adapt "
                             "the smallest components) or 'ipm' (instruction-previewed: the largest).")
        if self.init != "corda":
            if self.corda_mode != "kpm" or self.calib is not None:
                raise ValueError(f"LoRAConfig.corda_mode / calib apply to init='corda' only (init={self.init!r}); "
                                 "drop them or set init='corda'.")
            return
        if self.calib is None:
            raise ValueError("LoRAConfig(init='corda') needs calib=...: token ids (batch x seq), a dict of model "
                             "inputs, a list of either, or a callable calib(model) that runs the model.")
        ok = lambda c: callable(c) or isinstance(c, dict) or _is_tensor(c)  # noqa: E731
        if not (self.calib == "saved" if isinstance(self.calib, str) else
                (ok(self.calib) or (isinstance(self.calib, (list, tuple)) and self.calib and all(map(ok, self.calib))))):
            raise ValueError(f"LoRAConfig.calib: got {type(self.calib).__name__}; pass token ids (a tensor), a dict of "
                             "model inputs, a non-empty list of either, or a callable calib(model).")
        if self.dora:
            raise ValueError("LoRAConfig(init='corda', dora=True) is not supported; use dora=False.")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["calib"] = "saved" if self.init == "corda" else None  # activations are not saved: the factors are
        return data

    @property
    def holds_residual(self) -> bool:
        """True when the patched base weight holds ``W - s·(initial update)`` (PiSSA, CorDA, LoLDU)."""
        return self.init in self.RESIDUAL_INITS

    @property
    def scale(self) -> float:
        """The factor s multiplying the low-rank product."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r
