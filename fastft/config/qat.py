"""``QATConfig``: quantization-aware fine-tuning (fake-quant of weights, activations and KV; rotations)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from .checks import MethodConfig, check_bool, register_config, with_known_names

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


@register_config
@with_known_names
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
