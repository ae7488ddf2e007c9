"""Quantization grids as pure math: the integer code range, the scale floor and the argument rules.

The spec (scales, zero points, rounding, the straight-through gradient) is the docstring of
:mod:`fastft.ops.fake_quantize`; this module holds the constants and checks it, the kernels, the C++
bindings and config validation share. No torch.library op, no backend.
"""
from __future__ import annotations

from typing import Optional

from .hadamard import hadamard_factorization

__all__ = ["GRANULARITIES", "SCALE_EPS", "STE_MODES", "check_quant_args", "qrange"]

SCALE_EPS = 1e-8
"""Lower bound of every scale (see :mod:`fastft.ops.fake_quantize`)."""

GRANULARITIES = ("token", "channel", "group", "tensor")
STE_MODES = ("identity", "clipped")


# --------------------------------------------------------------------------- validation
def check_quant_args(
    bits: int, granularity: str, group_size: int, symmetric: bool, clip_ratio: float, ste: str = "identity",
    last_dim: Optional[int] = None, rotate: bool = False,
) -> None:
    """Raise ValueError/TypeError naming the argument unless the quantization arguments are valid."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: fake quantization supports integer bits from 2 to 8")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: choose one of {list(GRANULARITIES)}")
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r}: must be a positive integer")
        if last_dim is not None and last_dim % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the last dimension {last_dim}; choose a divisor of "
                f"{last_dim} (e.g. {_divisor_hint(last_dim, group_size)}) or granularity='token'"
            )
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric={symmetric!r}: must be True or False")
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio!r}: must be a number in (0, 1]")
    if ste not in STE_MODES:
        raise ValueError(f"ste={ste!r}: choose one of {list(STE_MODES)}")
    if not isinstance(rotate, bool):
        raise ValueError(f"rotate={rotate!r}: must be True or False")
    if rotate and last_dim is not None:
        hadamard_factorization(last_dim)


def _divisor_hint(d: int, wanted: int) -> int:
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    return min(divisors, key=lambda g: (abs(g - wanted), -g))


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1
