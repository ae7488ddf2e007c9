"""What fastft reads from a bitsandbytes 4-bit layer, without importing bitsandbytes unless it is there.

:func:`four_bit_weight` gives the plain-tensor view of a ``Linear4bit`` weight that ops and kernels take
(:class:`fastft.ops.dequantize_4bit.FourBitWeight`).
"""
from __future__ import annotations

import sys
import torch
from torch import Tensor, nn

from .ops.dequantize_4bit import FourBitWeight, unnest_absmax


def is_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def four_bit_weight(module: nn.Module) -> FourBitWeight:
    """The :class:`FourBitWeight` of a quantized ``Linear4bit`` (its weight must already be quantized)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a CPU weight into a private layout the first time its own forward runs in
        # eval mode without grad (on CPUs with AVX512-BF16); put the standard layout back, as bitsandbytes
        # itself does before saving or moving the weight.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    if state is None:
        raise ValueError(
            "this Linear4bit holds no quantization state yet: bitsandbytes quantizes the weight when the layer "
            "is moved to a device (e.g. layer.to('cpu') or .cuda()); do that before patching."
        )
    absmax = state.absmax
    if state.nested:
        absmax = unnest_absmax(absmax, state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset)
    shape = tuple(int(s) for s in state.shape)
    return FourBitWeight(
        packed=weight.data.reshape(-1).view(torch.uint8),
        absmax=absmax.float(),
        code=state.code.float().to(weight.device),
        blocksize=int(state.blocksize),
        shape=(shape[0], shape[1]),
        dtype=state.dtype,
        quant_type=state.quant_type,
    )


def requantize_like(module: nn.Module, weight: Tensor) -> nn.Module:
    """A new ``Linear4bit`` holding ``weight`` quantized with ``module``'s settings (same bias, device)."""
    import bitsandbytes as bnb

    state = module.weight.quant_state
    new = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=module.compute_dtype,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=module.weight.data.dtype,
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        weight.detach().to("cpu", state.dtype),
        requires_grad=False,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        blocksize=state.blocksize,
        quant_storage=module.weight.data.dtype,
    )
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return new.to(module.weight.device)
