"""One DoRA linear layer, forward + backward: fastft DoRA vs PEFT DoRA vs plain and compiled PyTorch (fastft LoRA the floor).

    python -m benchmarks.dora_layer --quick   # this module's benchmarks ("dora", "qdora") through the suite
    python -m benchmarks --only dora,qdora    # the same

The providers share one frozen weight W (out×in, no bias, as in Llama) and carry the same non-zero A (r×in),
B (out×r) and magnitude m (out, set away from its initial row norms), scale alpha/r, the norm detached (the
DoRA paper's and PEFT's default). x requires grad, as inside a network; one step is ``y = layer(x);
y.backward(g)``. Peers: PEFT DoRA, ``torch.compile`` of the same math in plain PyTorch (full sweep); the floor
is fastft LoRA at the same point (what DoRA adds its cost to). PEFT DoRA builds the out×in matrix W + s·BA on
every forward: its peak live bytes show it. What is measured and how: ``benchmarks.harness``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import fastft

from .lora_layer import OneLinear


class EagerDoRA(nn.Module):
    """DoRA in plain PyTorch: ``m / ||W + s·BA||_row (detached) · (W x + s·B(A x))`` (the compiled peer's code)."""

    def __init__(self, base: nn.Module, lora_A, lora_B, magnitude, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.magnitude = nn.Parameter(magnitude.detach().clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        norm = (weight + self.scale * (self.lora_B @ self.lora_A)).norm(dim=1).detach()
        y = self.base(x) + self.scale * ((x @ self.lora_A.t()) @ self.lora_B.t())
        return y * (self.magnitude / norm)


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs one DoRA linear layer over a dense base ("dora") and over a bitsandbytes NF4
# base with double quantization ("qdora"), in=out=hidden, no bias, norm detached (the default), across
# one-at-a-time sweeps around a base point. Providers: fastft DoRA on every backend that runs here, PEFT DoRA
# (the peer) and fastft LoRA at the same point as the floor ("lora": what DoRA adds its cost to).
SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(hidden=512, tokens=256, rank=16, dtype="float32"), dict(hidden=[512, 1024])),
    ("cpu", "full"): (dict(hidden=2048, tokens=512, rank=16, dtype="float32"),
                      dict(hidden=[512, 1024, 2048, 4096], tokens=[128, 512, 2048], rank=[8, 16, 64, 256],
                           dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                        dict(hidden=[2048, 4096], tokens=[4096, 16384])),
    ("cuda", "full"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                       dict(hidden=[1024, 2048, 4096, 8192], tokens=[1024, 4096, 16384], rank=[8, 16, 64, 256],
                            dtype=["bfloat16", "float16", "float32"])),
}
QDORA_SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(hidden=512, tokens=256, rank=16, dtype="float32"), dict(hidden=[512])),
    ("cpu", "full"): (dict(hidden=2048, tokens=512, rank=16, dtype="float32"),
                      dict(hidden=[1024, 2048, 4096], tokens=[128, 512, 2048], rank=[16, 64])),
    ("cuda", "quick"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"), dict(hidden=[2048, 4096])),
    ("cuda", "full"): (dict(hidden=4096, tokens=4096, rank=16, dtype="bfloat16"),
                       dict(hidden=[1024, 2048, 4096, 8192], tokens=[1024, 4096, 16384], rank=[16, 64],
                            dtype=["bfloat16", "float16"])),
}


def suite_subjects(config: dict, ctx, quantized: bool) -> list:
    """fastft DoRA (each backend), PEFT DoRA and fastft LoRA (floor) at one point, sharing W, A, B and m."""
    from .harness import (DTYPES, Skipped, Subject, compiled_peer, fastft_backends, forced_backend, installed,
                          missing_note, not_run_here)
    from .lora_layer import suite_base_layer

    hidden, tokens, rank = config["hidden"], config["tokens"], config["rank"]
    dtype, device = DTYPES[config["dtype"]], ctx.device
    base = suite_base_layer(hidden, dtype, device, quantized)
    peer_backend = "bnb" if quantized else "eager"

    holders = {}
    for name, dora in (("dora", True), ("lora", False)):
        holders[name] = OneLinear(base)
        fastft.patch(holders[name], fastft.LoRAConfig(r=rank, alpha=2 * rank, targets=["proj"], dora=dora))
    layer, lora = holders["dora"].proj, holders["lora"].proj
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero and m at the row norms: move both so every term matters
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        layer.lora_magnitude_vector.mul_(0.9 + 0.2 * torch.rand(hidden, generator=gen).to(device))
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_(True)
    grad_y = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    dora_grads = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]

    subjects: list = []
    backends, skipped = fastft_backends(layer.op, device)
    for backend in backends:
        subjects.append(Subject("fastft", backend, "fastft", lambda: layer(x), grad_y, dora_grads, holders["dora"],
                                context=lambda backend=backend: forced_backend(backend),
                                flops_context=lambda: forced_backend("torch")))
    subjects += skipped
    if installed("peft"):
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(OneLinear(base), LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"], use_dora=True))
        peft_layer = peft_model.base_model.model.proj
        peft_params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                       peft_layer.lora_magnitude_vector["default"].weight]
        with torch.no_grad():
            for ours, theirs in zip(dora_grads[1:], peft_params):
                theirs.copy_(ours)
        subjects.append(Subject("peft", peer_backend, "peer", lambda: peft_layer(x), grad_y, [x, *peft_params],
                                peft_layer))
    else:
        subjects.append(Skipped("peft", peer_backend, "peer", missing_note("peft", "the PEFT DoRA provider")))
    if quantized:
        subjects.append(not_run_here("torch.compile", "inductor", "peer", "bitsandbytes' 4-bit matmul does not "
                                     "compile into one graph; the dense-base DoRA (\"dora\") has the compiled peer"))
    else:
        eager = EagerDoRA(base, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scale)
        subjects.append(compiled_peer(ctx, eager, (x,), grad_y, [x, eager.lora_A, eager.lora_B, eager.magnitude], eager,
                                      what="DoRA in plain PyTorch"))
    subjects.append(Subject("lora", "torch", "floor", lambda: lora(x), grad_y, [x, lora.lora_A, lora.lora_B],
                            holders["lora"], context=lambda: forced_backend("torch")))
    return subjects


def suite_min_bytes(config: dict, mode: str, quantized: bool) -> int:
    """LoRA's minimum bytes (``benchmarks.lora_layer.suite_min_bytes``) plus what DoRA reads and writes besides:
    forward W once more (the row norm's P = W Aᵀ) and g (O float32); backward the saved output (N×O, for dg),
    g and dg."""
    from .harness import DTYPES
    from .lora_layer import suite_min_bytes as lora_min_bytes

    n, k = config["tokens"], config["hidden"]
    e = torch.empty(0, dtype=DTYPES[config["dtype"]]).element_size()
    w = (k * k // 2 + 4 * k * k // 64) if quantized else k * k * e
    forward = lora_min_bytes(config, "forward", quantized) + w + 4 * k
    backward = lora_min_bytes(config, "backward", quantized) + n * k * e + 8 * k
    return {"forward": forward, "backward": backward, "step": forward + backward}[mode]


def _suite_cases(op: str, sweeps: dict, quantized: bool):
    from .harness import COMPILE_SECONDS, layer_case, layer_estimate, sweep_of, sweep_points
    from .lora_layer import suite_step_flops

    def cases(ctx) -> list:
        base, variables = sweep_of(op, sweeps, ctx)
        slowdown = 2.0 if quantized else 1.0  # dequantizing the 4-bit weight on every pass
        flops = lambda p: suite_step_flops(p) + 2.0 * p["hidden"] ** 2 * p["rank"]  # noqa: E731  (+ P = W Aᵀ)
        return [
            layer_case(
                op, point, x_names,
                build=lambda config, ctx: suite_subjects(config, ctx, quantized),
                min_bytes=lambda config, mode: suite_min_bytes(config, mode, quantized),
                estimate_s=lambda ctx, point=point: layer_estimate(flops(point), 3, ctx, slowdown)
                + (COMPILE_SECONDS if ctx.compile and not quantized else 0.0),
            )
            for point, x_names in sweep_points(base, variables)
        ]

    return cases


def suite_benchmarks(sweeps: dict | None = None, qdora_sweeps: dict | None = None) -> list:
    """The DoRA layer benchmarks of ``python -m benchmarks`` ("dora", "qdora"); sweeps replaceable (tests)."""
    from .harness import Benchmark

    return [
        Benchmark("dora", _suite_cases("dora", sweeps or SUITE_SWEEPS, quantized=False),
                  "one DoRA linear layer (dense base), forward + backward", tags=("layer",)),
        Benchmark("qdora", _suite_cases("qdora", qdora_sweeps or QDORA_SUITE_SWEEPS, quantized=True),
                  "one DoRA linear layer over a bitsandbytes NF4 base, forward + backward", tags=("layer",),
                  requires=("bitsandbytes",)),
    ]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("dora_layer", suite_benchmarks()))
