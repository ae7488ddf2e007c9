"""QAT inside attention: the transformers attention function ``fastft_qat_<impl>`` (R3, fake-quantized keys
and values), registered with transformers' ``AttentionInterface``.

Inside attention (:func:`quant_attention`): with R3 the queries and keys are rotated after RoPE, ``q ↦ q Q₃``, ``k ↦ k Q₃`` (``Q₃ = Hᵀ`` over ``head_dim``,
which leaves ``q kᵀ`` unchanged), then with ``kv_bits`` the keys and values are fake-quantized per token
and head; the model's own attention implementation (sdpa, eager) runs on the result. The KV cache, when
one is used, holds the unquantized keys and values: they are quantized afresh at each step, which gives
the same numbers as quantizing them once on the way in.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from ..ops.hadamard import hadamard_transform
from .qat import QuantSpec

ATTENTION_PREFIX = "fastft_qat_"
SETTINGS_ATTR = "_fastft_qat_attention"


@dataclass
class AttentionQuant:
    """Per attention module: the online R3, the KV quantizer, and the implementation to run afterwards."""

    r3: bool
    kv: QuantSpec | None
    inner: Callable[..., Any]
    recorder: Callable[[Tensor, Tensor, Tensor], None] | None = None  # calibration: sees (q, k, v)


def quant_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs):
    """transformers attention function: R3 on q and k, fake-quantized k and v, then the inner function."""
    settings: AttentionQuant = module.__dict__[SETTINGS_ATTR]
    if settings.recorder is not None:
        settings.recorder(query, key, value)
    if settings.r3:
        query, key = hadamard_transform(query), hadamard_transform(key)
    if settings.kv is not None:
        key, value = settings.kv(key), settings.kv(value)
    return settings.inner(module, query, key, value, attention_mask, **kwargs)


def inner_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    """The function transformers would run for ``implementation`` in ``module``'s family."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__}'s module has no eager_attention_forward")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


SUPPORTED_ATTENTION = ("sdpa", "eager")


def register_attention() -> None:
    """Register ``fastft_qat_<impl>`` with transformers' attention and mask interfaces (idempotent).

    Adding a named function to these registries is transformers' extension point; nothing of
    transformers is replaced. A model uses it only when its own config names it (per instance).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for implementation in SUPPORTED_ATTENTION:
        name = ATTENTION_PREFIX + implementation
        AttentionInterface.register(name, quant_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
