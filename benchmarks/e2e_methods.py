"""The methods ``benchmarks.e2e`` trains end to end: one patching function per provider (fastft, PEFT, or another
peer), the seeded adapters every variant starts from, and :data:`METHODS`. Add a method here (see the
``benchmarks.e2e`` docstring); ``benchmarks.e2e`` re-exports every name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the decoder layers (``nn.Linear`` or bitsandbytes ``Linear4bit``), by name."""
    from fastft.bnb import is_linear4bit

    return {
        name: module for name, module in model.named_modules()
        if ".layers." in f".{name}." and (type(module) is nn.Linear or is_linear4bit(module))
    }


def seeded_lora_adapters(model: nn.Module, setup) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) for every decoder linear: A Kaiming-uniform (bound 1/sqrt(in)) from a seeded generator, B zero."""
    gen = torch.Generator().manual_seed(setup.seed + 3)
    adapters = {}
    for name, module in sorted(decoder_linears(model).items()):
        bound = 1.0 / math.sqrt(module.in_features)
        lora_A = (torch.rand(setup.rank, module.in_features, generator=gen) * 2 - 1) * bound
        adapters[name] = (lora_A, torch.zeros(module.out_features, setup.rank))
    return adapters


def quantize_decoder_linears(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Every decoder ``nn.Linear`` replaced by a bitsandbytes NF4 ``Linear4bit`` (double quant) on ``device``."""
    import bitsandbytes as bnb

    for name, module in list(decoder_linears(model).items()):
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        quantized.load_state_dict(module.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized.to(device))  # quantized when moved
    return model


def _lora_fastft(model, setup):
    import fastft

    adapters = seeded_lora_adapters(model, setup)
    fastft.patch(model, fastft.LoRAConfig(r=setup.rank, alpha=setup.alpha, targets="all-linear"))
    _copy_adapters(model, adapters)
    return model


def _lora_peft(model, setup):
    return _peft_adapters(model, setup, use_dora=False)


def _peft_adapters(model, setup, use_dora: bool):
    """``model`` wrapped in PEFT LoRA (or DoRA) on every decoder linear layer, A and B set to the seeded ones."""
    from peft import LoraConfig, get_peft_model

    adapters = seeded_lora_adapters(model, setup)
    peft_model = get_peft_model(model, LoraConfig(r=setup.rank, lora_alpha=setup.alpha, lora_dropout=0.0,
                                                  target_modules="all-linear", use_dora=use_dora))
    base = peft_model.get_base_model()
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapters.items():
            layer = base.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
    return peft_model


def _copy_adapters(model, adapters) -> None:
    import fastft

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, fastft.nn.LoRALinear):
                module.lora_A.copy_(adapters[name][0])
                module.lora_B.copy_(adapters[name][1])


def _dora_fastft(model, setup):
    """fastft DoRA (norm detached, as PEFT) on every decoder linear layer; magnitudes start at the row norms."""
    import fastft

    adapters = seeded_lora_adapters(model, setup)
    fastft.patch(model, fastft.LoRAConfig(r=setup.rank, alpha=setup.alpha, targets="all-linear", dora=True))
    _copy_adapters(model, adapters)
    return model


def _dora_peft(model, setup):
    return _peft_adapters(model, setup, use_dora=True)


def _qat_lora_fastft(model, setup):
    """QAT (W4 per channel, A8 per token, rotations R1, R2, R4) with LoRA on every decoder linear layer."""
    import fastft

    adapters = seeded_lora_adapters(model, setup)
    fastft.patch(model, [fastft.QATConfig(w_bits=4, a_bits=8),
                         fastft.LoRAConfig(r=setup.rank, alpha=setup.alpha, targets="all-linear")])
    _copy_adapters(model, adapters)
    return model


def s2ft_config(model: nn.Module, setup):
    """S²FT with about as many trainable parameters as the LoRA of ``setup`` on every decoder linear layer:
    one attention head's o_proj columns per layer, the rest in down_proj's columns (FFN channels)."""
    import fastft

    config = model.config
    lora_per_layer = sum(setup.rank * (m.in_features + m.out_features) for m in decoder_linears(model).values())
    lora_per_layer //= config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    channels = max(1, round(lora_per_layer / config.hidden_size) - head_dim)
    return fastft.S2FTConfig(attn_ratio=1 / config.num_attention_heads,
                             ffn_ratio=min(1.0, channels / config.intermediate_size), seed=setup.seed)


def _s2ft_fastft(model, setup):
    import fastft

    fastft.patch(model, s2ft_config(model, setup))
    return model


def sparse_config(model: nn.Module, setup):
    """Sparse fine-tuning (a random support, SpIEL's starting point) with about LoRA's trainable count of ``setup``
    on every decoder linear layer: density = Σ r·(in+out) / Σ in·out."""
    import fastft

    linears = decoder_linears(model).values()
    lora = sum(setup.rank * (m.in_features + m.out_features) for m in linears)
    dense = sum(m.in_features * m.out_features for m in linears)
    return fastft.SparseConfig(method="random", density=lora / dense, targets="all-linear", seed=setup.seed)


def _sparse_fastft(model, setup):
    import fastft

    fastft.patch(model, sparse_config(model, setup))
    return model


def _shira_peft(model, setup):
    """PEFT's SHiRA (a random sparse support of r·(in+out) entries a layer: LoRA's count) on every decoder linear."""
    from peft import ShiraConfig, get_peft_model

    return get_peft_model(model, ShiraConfig(r=setup.rank, target_modules="all-linear", random_seed=setup.seed))


@dataclass(frozen=True)
class Method:
    """A fine-tuning method trained end to end: one patching function per provider.

    ``providers[name](model, setup)`` patches (or wraps) the base model and returns the model to train;
    ``prepare_base(model, dtype, device)`` runs first when given (e.g. quantize for QLoRA); ``requires``:
    packages every variant needs. A provider other than "fastft" is a peer; "peft" needs PEFT installed.
    ``quick=False`` leaves the method out of ``--quick`` (which must stay under 3 minutes on a 2-core CPU).
    """

    name: str
    providers: dict[str, Callable]
    prepare_base: Callable | None = None
    requires: tuple[str, ...] = ()
    description: str = ""
    quick: bool = True  # False: the full sweep only (a skipped row in --quick says so)


METHODS: dict[str, Method] = {
    "lora": Method("lora", {"fastft": _lora_fastft, "peft": _lora_peft},
                   description="LoRA on every decoder linear layer"),
    "qlora": Method("qlora", {"fastft": _lora_fastft, "peft": _lora_peft}, prepare_base=quantize_decoder_linears,
                    requires=("bitsandbytes",), description="LoRA over an NF4 (double-quantized) base"),
    "dora": Method("dora", {"fastft": _dora_fastft, "peft": _dora_peft},
                   description="DoRA on every decoder linear layer (norm detached)"),
    "qdora": Method("qdora", {"fastft": _dora_fastft, "peft": _dora_peft}, prepare_base=quantize_decoder_linears,
                    requires=("bitsandbytes",), description="DoRA over an NF4 (double-quantized) base", quick=False),
    # PEFT has no QAT and no S²FT: their peer is LoRA (fastft's, the e2e-lora variant: run once, shared)
    "qat": Method("qat", {"fastft": _qat_lora_fastft, "lora": _lora_fastft},
                  description="QAT+LoRA (W4A8, rotations R1, R2, R4) on every decoder linear layer; peer: LoRA "
                              "(PEFT has no QAT)"),
    "s2ft": Method("s2ft", {"fastft": _s2ft_fastft, "lora": _lora_fastft},
                   description="S²FT with LoRA's trainable count (one head + FFN channels per layer); peer: LoRA "
                               "(PEFT has no S²FT)"),
    "sparse": Method("sparse", {"fastft": _sparse_fastft, "peft": _shira_peft, "lora": _lora_fastft},
                     description="sparse fine-tuning (a random support, LoRA's trainable count) on every decoder "
                                 "linear layer; peers: PEFT SHiRA (its sparse method) and LoRA", quick=False),
}
