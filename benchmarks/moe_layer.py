"""One MoE experts layer (Qwen3-MoE's fused 3-D experts), forward + backward: fastft ``LoRAExperts`` vs PEFT's
expert LoRA (``target_parameters`` / ``ParamWrapper``) vs the frozen experts alone; fastft ``DoRAExperts`` beside
them (PEFT refuses DoRA on experts, so it has no peer).

    python -m benchmarks.moe_layer --quick   # this module's benchmarks ("moe_lora", "moe_dora") through the suite
    python -m benchmarks --only moe_lora     # the same

Every provider runs the same ``Qwen3MoeExperts`` module (gate_up_proj E×2I×H, down_proj E×H×I, frozen) on the same
hidden states (tokens×H, requiring grad) and the same routing (top-k expert ids and weights from a fixed random
router). fastft and PEFT carry the same per-expert A and B (both non-zero, scale alpha/r). One step is
``y = experts(x, top_k_index, top_k_weights); y.backward(g)``. fastft runs its segment GEMMs through the per-segment
loop ("fastft[torch]", what runs off Hopper) and through ``torch._grouped_mm`` ("fastft[grouped]",
``FASTFT_GROUPED_MM=grouped``, what runs on CUDA sm90+); the frozen experts and PEFT run the experts implementation
transformers picks for a model ("grouped_mm": ``torch._grouped_mm``, which the CPU build runs too). PEFT forms
W + s·B·A for every expert each forward (one ``baddbmm``) and runs the frozen forward on it; fastft never forms B·A.
The ``torch.compile`` peer (full sweep) compiles :func:`experts_reference`, the same math in plain PyTorch through
``torch._grouped_mm`` (B·A not formed for LoRA; DoRA's row norms from W + s·B·A, detached, as PEFT computes them);
torch 2.13 compiles ``torch._grouped_mm`` for bfloat16 only, so its float32 points list the peer as not run.
What is measured and how: ``benchmarks.harness``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
from torch import nn

import fastft

SUITE_SWEEPS = {
    # (device type, sweep): (base point, {variable: values})
    ("cpu", "quick"): (dict(hidden=256, intermediate=128, experts=8, top_k=2, tokens=256, rank=16, dtype="float32"),
                       dict(experts=[8, 32], tokens=[256, 1024])),
    ("cpu", "full"): (dict(hidden=512, intermediate=256, experts=16, top_k=2, tokens=512, rank=16, dtype="float32"),
                      dict(experts=[8, 16, 64], tokens=[256, 1024, 4096], rank=[8, 16, 64],
                           dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(hidden=2048, intermediate=768, experts=64, top_k=8, tokens=4096, rank=16, dtype="bfloat16"),
                        dict(experts=[64, 128], tokens=[4096, 16384])),
    ("cuda", "full"): (dict(hidden=2048, intermediate=768, experts=128, top_k=8, tokens=8192, rank=16,
                            dtype="bfloat16"),
                       dict(experts=[32, 64, 128], tokens=[2048, 8192, 32768], rank=[8, 16, 64])),
}


class Holder(nn.Module):
    """A module holding one experts module as ``experts``: what fastft.patch and PEFT both patch."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x, top_k_index, top_k_weights):
        return self.experts(x, top_k_index, top_k_weights)


@contextlib.contextmanager
def grouped_mm(path: str):
    """``FASTFT_GROUPED_MM=path`` around a call."""
    old = os.environ.get("FASTFT_GROUPED_MM")
    os.environ["FASTFT_GROUPED_MM"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTFT_GROUPED_MM", None)
        else:
            os.environ["FASTFT_GROUPED_MM"] = old


def suite_experts(config: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """The frozen Qwen3-MoE experts module of a suite point, using transformers' grouped_mm experts forward."""
    import transformers as tf
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = tf.Qwen3MoeConfig(hidden_size=config["hidden"], moe_intermediate_size=config["intermediate"],
                            num_experts=config["experts"], num_experts_per_tok=config["top_k"])
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=config["hidden"] ** -0.5)
    return experts.to(device=device, dtype=dtype).requires_grad_(False)


def experts_reference(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: nn.Module,
                      factors: dict, scale: float, magnitudes: dict | None = None) -> torch.Tensor:
    """LoRA (DoRA with ``magnitudes``) on a gated experts module in plain PyTorch: the compiled peer's code.

    Tokens sorted by expert, every projection P in ``factors`` (name -> (A E×R×K, B E×O×R)) through grouped GEMMs::

        y_P = x W_Pᵀ + s·(x A_Pᵀ) B_Pᵀ                       (per expert segment)
        y_P ← y_P ⊙ m_P / ‖W_P + s·B_P A_P‖_row  (detached)    (DoRA)

    then the module's gate, the down projection, the routing weights and the sum over each token's experts.
    """
    E, k = experts.num_experts, top_k_index.shape[-1]
    sorted_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    rows = perm // k
    counts = torch.histc(sorted_ids.float(), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)

    def project(h: torch.Tensor, param: str) -> torch.Tensor:
        weight = getattr(experts, param).to(h.dtype)  # E×O×K
        y = torch._grouped_mm(h, weight.transpose(1, 2), offs=offsets)
        if param not in factors:
            return y
        A, B = (t.to(h.dtype) for t in factors[param])
        xa = torch._grouped_mm(h, A.transpose(1, 2), offs=offsets)
        y = y + scale * torch._grouped_mm(xa, B.transpose(1, 2), offs=offsets)
        if magnitudes is not None:
            norm = torch.linalg.vector_norm(weight + scale * torch.bmm(B, A), dim=2).detach()
            y = y * (magnitudes[param] / norm).to(y.dtype)[sorted_ids]
        return y

    h = experts._apply_gate(project(x[rows], "gate_up_proj"))
    y = project(h, "down_proj") * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    return torch.zeros_like(x).index_add(0, rows, y)


def compiled_subject(ctx, base: nn.Module, layer: nn.Module, dtype: torch.dtype, args: tuple, grad_y: torch.Tensor,
                     dora: bool):
    """torch.compile of :func:`experts_reference` on the fastft layer's own factors (bfloat16 only, see above)."""
    from .harness import compiled_peer, not_run_here

    if dtype != torch.bfloat16:
        return not_run_here("torch.compile", "inductor", "peer", "torch 2.13 compiles torch._grouped_mm (the "
                            "reference's segment GEMMs) for bfloat16 only; the bfloat16 points have this peer")
    factors = {p: (getattr(layer, f"lora_A_{p}"), getattr(layer, f"lora_B_{p}")) for p in layer.params}
    magnitudes = {p: getattr(layer, f"lora_magnitude_{p}") for p in layer.params} if dora else None
    grads = [args[0]] + [t for p in layer.params for t in factors[p]] + list((magnitudes or {}).values())
    reference = lambda x, index, weights: experts_reference(  # noqa: E731
        x, index, weights, base, factors, layer.scale, magnitudes)
    return compiled_peer(ctx, reference, args, grad_y, grads, layer,
                         what="LoRA on experts in plain PyTorch (experts_reference)")


def suite_subjects(config: dict, ctx, dora: bool) -> list:
    from .harness import DTYPES, Skipped, Subject, installed, missing_note

    tokens, rank, E, k = config["tokens"], config["rank"], config["experts"], config["top_k"]
    dtype, device = DTYPES[config["dtype"]], ctx.device
    base = suite_experts(config, dtype, device)
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    holder = Holder(copy.deepcopy(base))
    fastft.patch(holder, fastft.LoRAConfig(r=rank, alpha=2 * rank, targets=targets, dora=dora))
    layer = holder.experts
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.params:
            B = getattr(layer, f"lora_B_{p}")
            B.copy_(torch.randn(B.shape, generator=gen) * 0.02)
    x = torch.randn(tokens, config["hidden"], generator=gen).to(device, dtype).requires_grad_(True)
    logits = torch.randn(tokens, E, generator=gen)
    weights, index = torch.topk(logits.softmax(-1), k, dim=-1)
    weights, index = (weights / weights.sum(-1, keepdim=True)).to(device, dtype), index.to(device)
    grad_y = torch.randn(tokens, config["hidden"], generator=gen).to(device, dtype)
    ours = [x] + [getattr(layer, f"lora_{w}_{p}") for p in layer.params for w in ("A", "B")]
    if dora:
        ours += [getattr(layer, f"lora_magnitude_{p}") for p in layer.params]

    subjects: list = []
    for path, backend in (("loop", "torch"), ("grouped", "grouped")):
        subjects.append(Subject("fastft", backend, "fastft", lambda: holder(x, index, weights), grad_y, ours, holder,
                                context=lambda path=path: grouped_mm(path)))
    if dora:
        subjects.append(Skipped("peft", "ParamWrapper", "peer", "PEFT refuses DoRA with target_parameters "
                                "(expert weights); fastft DoRA on experts has no peer"))
    elif installed("peft"):
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(Holder(copy.deepcopy(base)), LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[], target_parameters=targets))
        theirs = [x]
        with torch.no_grad():
            for p in layer.params:  # PEFT's layout: A (E·r × in), B (out × r·E)
                A, B = layer.peft_tensors(p)
                wrapper = next(m for n, m in peft_model.named_modules()
                               if getattr(m, "parameter_name", None) == p and hasattr(m, "lora_A"))
                wrapper.lora_A["default"].weight.copy_(A)
                wrapper.lora_B["default"].weight.copy_(B)
                theirs += [wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight]
        subjects.append(Subject("peft", "ParamWrapper", "peer", lambda: peft_model(x, index, weights), grad_y, theirs,
                                peft_model))
    else:
        subjects.append(Skipped("peft", "ParamWrapper", "peer", missing_note("peft", "the PEFT provider")))
    subjects.append(compiled_subject(ctx, base, layer, dtype, (x, index, weights), grad_y, dora))
    frozen = Holder(base)
    subjects.append(Subject("frozen", "grouped_mm", "floor", lambda: frozen(x, index, weights), grad_y, [x], frozen))
    return subjects


def suite_step_flops(config: dict) -> float:
    """A step's FLOPs for the fastft LoRA: expert_lora's forward + backward for gate_up and down projections."""
    S, H, I, r = config["tokens"] * config["top_k"], config["hidden"], config["intermediate"], config["rank"]
    per = lambda K, O: 2 * S * K * O + 2 * S * r * (K + O) + 2 * S * K * O + 4 * S * r * (K + O)  # noqa: E731
    return float(per(H, 2 * I) + per(I, H))


def _suite_cases(op: str, sweeps: dict, dora: bool):
    from .harness import COMPILE_SECONDS, layer_case, layer_estimate, sweep_of, sweep_points

    def cases(ctx) -> list:
        base, variables = sweep_of(op, sweeps, ctx)
        return [
            layer_case(op, point, x_names, build=lambda config, ctx: suite_subjects(config, ctx, dora),
                       estimate_s=lambda ctx, point=point: layer_estimate(suite_step_flops(point), 4, ctx, 2.0)
                       + (COMPILE_SECONDS if ctx.compile and point["dtype"] == "bfloat16" else 0.0))
            for point, x_names in sweep_points(base, variables)
        ]

    return cases


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """The MoE layer benchmarks of ``python -m benchmarks`` ("moe_lora", "moe_dora"); sweeps replaceable (tests)."""
    from .harness import Benchmark

    return [
        Benchmark("moe_lora", _suite_cases("moe_lora", sweeps or SUITE_SWEEPS, dora=False),
                  "LoRA on one MoE experts layer (fused 3-D experts), forward + backward", tags=("layer",),
                  requires=("transformers",)),
        Benchmark("moe_dora", _suite_cases("moe_dora", sweeps or SUITE_SWEEPS, dora=True),
                  "DoRA on one MoE experts layer (fused 3-D experts), forward + backward", tags=("layer",),
                  requires=("transformers",)),
    ]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("moe_layer", suite_benchmarks()))
