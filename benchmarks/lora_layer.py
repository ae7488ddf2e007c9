"""One LoRA linear layer, forward + backward: fastft ``LoRALinear`` vs PEFT LoRA vs plain and compiled PyTorch.

    python -m benchmarks.lora_layer --quick   # this module's benchmarks ("lora", "qlora") through the suite
    python -m benchmarks --only lora,qlora    # the same

The providers share one weight W (out×in = hidden×hidden, frozen, no bias, as in Llama); fastft, PEFT and the
plain PyTorch peer carry the same A (r×in) and B (out×r), both non-zero, with the same scale alpha/r. The input
x requires grad, as it does inside a network; one step is ``y = layer(x); y.backward(g)`` with a fixed upstream
gradient g, the gradients of x, A and B dropped before each step. Peers: PEFT, ``pytorch`` (the same math in
eager PyTorch), ``torch.compile`` of that (full sweep), and the floor ``frozen`` (the base layer alone: LoRA
cannot be cheaper). What is measured and how: ``benchmarks.harness``. This module only declares the cases.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import fastft


class OneLinear(nn.Module):
    """A module holding one linear layer as ``proj``: what fastft.patch and PEFT both patch."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs the LoRA layer over a dense base ("lora") and a bitsandbytes 4-bit NF4 base
# with double quantization ("qlora"), in=out=hidden, no bias, across one-at-a-time sweeps around a base
# point. Providers: fastft on every backend that runs here, PEFT, plain PyTorch ("pytorch": the base
# layer plus ``scale · (x Aᵀ) Bᵀ`` in eager PyTorch) and the floor ("frozen": the base layer alone).
SUITE_SWEEPS = {
    # (device type, sweep): (base point, {variable: values})
    ("cpu", "quick"): (dict(hidden=512, tokens=256, rank=16, dtype="float32"),
                       dict(hidden=[512, 1024], tokens=[256, 1024], rank=[16, 64], dtype=["float32", "bfloat16"])),
    ("cpu", "full"): (dict(hidden=2048, tokens=512, rank=16, dtype="float32"),
                      dict(hidden=[512, 1024, 2048, 4096], tokens=[128, 512, 2048], rank=[8, 16, 64, 256],
                           dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                        dict(hidden=[2048, 4096], tokens=[4096, 16384], rank=[16, 64], dtype=["bfloat16", "float32"])),
    ("cuda", "full"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                       dict(hidden=[1024, 2048, 4096, 8192], tokens=[1024, 4096, 16384], rank=[8, 16, 64, 256],
                            dtype=["bfloat16", "float16", "float32"])),
}
QLORA_SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(hidden=512, tokens=256, rank=16, dtype="float32"), dict(hidden=[512, 1024])),
    ("cpu", "full"): (dict(hidden=2048, tokens=512, rank=16, dtype="float32"),
                      dict(hidden=[1024, 2048, 4096], tokens=[128, 512, 2048], rank=[16, 64], dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                        dict(hidden=[2048, 4096], tokens=[4096, 16384])),
    ("cuda", "full"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                       dict(hidden=[1024, 2048, 4096, 8192], tokens=[1024, 4096, 16384], rank=[16, 64],
                            dtype=["bfloat16", "float16"])),
}


class EagerLoRA(nn.Module):
    """Plain PyTorch LoRA: ``base(x) + scale · (x Aᵀ) Bᵀ``, adapters cast to x's dtype (the "pytorch" peer)."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.to(x.dtype).t()) @ self.lora_B.to(x.dtype).t())


def suite_base_layer(hidden: int, dtype: torch.dtype, device: torch.device, quantized: bool, seed: int = 0) -> nn.Module:
    """The frozen base of a suite point: ``nn.Linear`` or an NF4 double-quantized ``Linear4bit`` of it."""
    torch.manual_seed(seed)
    dense = nn.Linear(hidden, hidden, bias=False)
    if quantized:
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(hidden, hidden, bias=False, compute_dtype=dtype, compress_statistics=True,
                                 quant_type="nf4")
        base.load_state_dict(dense.state_dict())
        base = base.to(device)  # bitsandbytes quantizes when the layer is moved
    else:
        base = dense.to(device=device, dtype=dtype)
    return base.requires_grad_(False)


def suite_subjects(config: dict, ctx, quantized: bool) -> list:
    """fastft (each backend), PEFT, plain PyTorch and the frozen base at one suite point, sharing one W, A, B."""
    from .harness import (DTYPES, Skipped, Subject, compiled_peer, fastft_backends, forced_backend, installed,
                          missing_note, not_run_here)

    hidden, tokens, rank = config["hidden"], config["tokens"], config["rank"]
    dtype, device = DTYPES[config["dtype"]], ctx.device
    base = suite_base_layer(hidden, dtype, device, quantized)
    peer_backend = "bnb" if quantized else "eager"

    holder = OneLinear(base)
    fastft.patch(holder, fastft.LoRAConfig(r=rank, alpha=2 * rank, targets=["proj"]))
    layer = holder.proj
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; a non-zero B makes every product of the update matter
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    x = (torch.randn(tokens, hidden, generator=gen)).to(device, dtype).requires_grad_(True)
    grad_y = (torch.randn(tokens, hidden, generator=gen)).to(device, dtype)

    subjects: list = []
    backends, skipped = fastft_backends(layer.op, device)
    for backend in backends:
        subjects.append(Subject(
            "fastft", backend, "fastft", lambda: layer(x), grad_y, [x, layer.lora_A, layer.lora_B], holder,
            context=lambda backend=backend: forced_backend(backend), flops_context=lambda: forced_backend("torch"),
        ))
    subjects += skipped

    if installed("peft"):
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            OneLinear(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"])
        )
        peft_layer = peft_model.base_model.model.proj
        peft_A, peft_B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        with torch.no_grad():
            peft_A.copy_(layer.lora_A)
            peft_B.copy_(layer.lora_B)
        subjects.append(Subject("peft", peer_backend, "peer", lambda: peft_layer(x), grad_y, [x, peft_A, peft_B],
                                peft_layer))
    else:
        subjects.append(Skipped("peft", peer_backend, "peer", missing_note("peft", "the PEFT provider")))

    eager = EagerLoRA(base, layer.lora_A, layer.lora_B, layer.scale)
    subjects.append(Subject("pytorch", peer_backend, "peer", lambda: eager(x), grad_y, [x, eager.lora_A, eager.lora_B],
                            eager))
    if quantized:
        subjects.append(not_run_here("torch.compile", "inductor", "peer", "bitsandbytes' 4-bit matmul does not "
                                     "compile into one graph; the dense-base LoRA (\"lora\") has the compiled peer"))
    else:
        compiled = EagerLoRA(base, layer.lora_A, layer.lora_B, layer.scale)
        subjects.append(compiled_peer(ctx, compiled, (x,), grad_y, [x, compiled.lora_A, compiled.lora_B], compiled,
                                      what="the plain PyTorch LoRA"))
    subjects.append(Subject("frozen", peer_backend, "floor", lambda: base(x), grad_y, [x], base))
    return subjects


def suite_min_bytes(config: dict, mode: str, quantized: bool) -> int:
    """Bytes the LoRA op must read and write at least (each operand once), for the roofline estimate.

    forward: x, W, A, B in; y, xa out. backward: g, x, xa, W, A, B in; dx, dA, dB out. A 4-bit W is
    half a byte a weight plus a float32 absmax per 64 weights (what fastft's kernels read).
    """
    from .harness import DTYPES

    n, k, r = config["tokens"], config["hidden"], config["rank"]
    e = torch.empty(0, dtype=DTYPES[config["dtype"]]).element_size()
    w = (k * k // 2 + 4 * k * k // 64) if quantized else k * k * e
    adapters = (r * k + k * r) * e
    forward = n * k * e + w + adapters + n * k * e + n * r * e
    backward = n * k * e + n * k * e + n * r * e + w + adapters + n * k * e + adapters
    return {"forward": forward, "backward": backward, "step": forward + backward}[mode]


def suite_step_flops(config: dict) -> float:
    n, k, r = config["tokens"], config["hidden"], config["rank"]
    return 4.0 * n * k * k + 10.0 * n * k * r


def _suite_cases(op: str, sweeps: dict, quantized: bool):
    from .harness import COMPILE_SECONDS, layer_case, layer_estimate, sweep_of, sweep_points

    def cases(ctx) -> list:
        base, variables = sweep_of(op, sweeps, ctx)
        providers = (5 if ctx.on_gpu else 4) + (not quantized and ctx.compile)
        slowdown = 2.0 if quantized else 1.0  # dequantizing the 4-bit weight on every pass
        return [
            layer_case(
                op, point, x_names,
                build=lambda config, ctx: suite_subjects(config, ctx, quantized),
                min_bytes=lambda config, mode: suite_min_bytes(config, mode, quantized),
                estimate_s=lambda ctx, point=point: layer_estimate(suite_step_flops(point), providers, ctx, slowdown)
                + (COMPILE_SECONDS if ctx.compile and not quantized else 0.0),
            )
            for point, x_names in sweep_points(base, variables)
        ]

    return cases


def suite_benchmarks(sweeps: dict | None = None, qlora_sweeps: dict | None = None) -> list:
    """The LoRA layer benchmarks of ``python -m benchmarks`` ("lora", "qlora"); sweeps replaceable (tests)."""
    from .harness import Benchmark

    return [
        Benchmark("lora", _suite_cases("lora", sweeps or SUITE_SWEEPS, quantized=False),
                  "one LoRA linear layer (dense base), forward + backward", tags=("layer",)),
        Benchmark("qlora", _suite_cases("qlora", qlora_sweeps or QLORA_SUITE_SWEEPS, quantized=True),
                  "one LoRA linear layer over a bitsandbytes NF4 base, forward + backward", tags=("layer",),
                  requires=("bitsandbytes",)),
    ]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("lora_layer", suite_benchmarks()))
