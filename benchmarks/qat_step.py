"""A training step of a small Llama: plain fastft LoRA vs QAT+LoRA (fake-quantized base, rotations).

    python -m benchmarks.qat_step --quick   # this module's benchmarks through the suite's command line
    python -m benchmarks.qat_step           # their full sweep (the suite's options apply: --only, --out, ...)

This module only declares its cases and how to run one; the command line, CSV, plots, summary and sanity
checks are the suite's (``benchmarks.suite``), the measurement procedure ``benchmarks.harness``'s. The text
below describes what the benchmarks measure (targets are reported by the summary's ratios, never asserted).

Providers, one copy of the same random Llama each, patched in one process:
  lora           fastft.LoRAConfig(r) on every decoder linear layer (the peer: what QAT adds cost to);
  qat+lora       the same LoRA plus fastft.QATConfig(w_bits=4, a_bits=8, rotations R1..R4): every linear
                 computes Q_a(x Q₄)·Q_w(W + s·BA)ᵀ, R3 rotates q and k inside attention;
  qat+lora kv4   the same with kv_bits=4 (keys and values fake-quantized inside attention);
  torchao+peft   the recipe without fastft (in the suite's "qat_step"): torchao's FakeQuantizedLinear (W4 per
                 channel, A8 per token) in place of every decoder linear, PEFT LoRA(r) on them, no rotations.
One step is ``loss = model(ids, labels=ids).loss; loss.backward()`` with the adapters' gradients dropped
first. Measured side by side (see ``fastft.measure``): time (median and p20/p80 of interleaved
runs, and the ratio to lora), bytes saved for backward (parameters excluded), peak live bytes of the
step, and matmul FLOPs (FlopCounterMode; fastft's custom ops counted through their reference code).

No target is set by the issue for this overhead; the figures are reported, never asserted. CPU times
on a shared machine are noisy: the 1-minute load average is printed with them.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

import fastft



DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUICK = dict(hidden=128, intermediate=384, layers=2, heads=4, batch=2, seq=64, rank=8, repeats=5, warmup=1)


@dataclass
class Provider:
    name: str
    model: torch.nn.Module
    report: str


def build_providers(args: argparse.Namespace, dtype: torch.dtype, device: torch.device | str = "cpu",
                    names: tuple[str, ...] | None = None) -> list[Provider]:
    """The providers of the module docstring (only ``names`` when given), each on its copy of one Llama."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
    )
    base = tf.LlamaForCausalLM(config).to(device, dtype)
    lora = fastft.LoRAConfig(r=args.rank, alpha=2 * args.rank)
    qat = dict(w_bits=4, a_bits=8, rotations=("r1", "r2", "r3", "r4"))
    setups = {
        "lora": [lora],
        "qat+lora": [fastft.QATConfig(**qat), lora],
        "qat+lora kv4": [fastft.QATConfig(**qat, kv_bits=4), lora],
    }
    providers = []
    for name, configs in setups.items():
        if names is not None and name not in names:
            continue
        model = copy.deepcopy(base).train()
        report = fastft.patch(model, configs)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B starts at zero; non-zero B makes every product matter
            for module in model.modules():
                if isinstance(module, fastft.nn.LoRALinear):
                    module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen).to(device) * 0.01)
        providers.append(Provider(name, model, str(report)))
    return providers


def torchao_peft_provider(base: torch.nn.Module, rank: int) -> Provider:
    """The recipe a user would pick without fastft: torchao's fake-quantized linears (W4 per channel, A8 per
    token, asymmetric, as fastft's QATConfig defaults) in place of every decoder linear, then PEFT LoRA of
    ``rank`` on them (base frozen). No rotations: torchao's QAT has none. Raises ImportError if either is absent."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.linear import FakeQuantizedLinear
    model = copy.deepcopy(base).train()
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=False)
    for name, module in list(model.named_modules()):
        if ".layers." in f".{name}." and isinstance(module, torch.nn.Linear):
            parent, leaf = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(parent, leaf, FakeQuantizedLinear.from_linear(module, activations, weights))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=TORCHAO_TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; non-zero B makes every product matter
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen).to(param.device, param.dtype) * 0.01)
    return Provider("torchao+peft", model, "torchao FakeQuantizedLinear (W4 channel, A8 token) + PEFT LoRA")


TORCHAO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for param in params:
            param.grad = None
        model(ids, labels=ids).loss.backward()

    return step


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs "qat_step": one training step (forward + backward) of a small Llama with QAT+LoRA
# (W4 per channel, A8 per token, rotations R1-R4) and with keys/values fake-quantized to 4 bits as well
# ("qat+lora-kv4"; not in the CPU --quick sweep), against plain fastft LoRA of the same rank ("lora") and "torchao+peft" (torchao's fake-quantized
# linears with PEFT LoRA on them: what a user would pick without fastft; no rotations, so it does less work).
# "fastft / best peer" is against the faster of the two. The providers compute different things on purpose (a
# quantized model), so no agreement is reported.
_STEP_KEYS = ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "rank")
_FULL = dict(hidden=512, intermediate=1536, layers=4, heads=8, vocab=1024, batch=4, seq=256, rank=16)
_QUICK = dict(QUICK, vocab=1024)
SUITE_SWEEPS = {
    ("cpu", "quick"): (dict({k: _QUICK[k] for k in _STEP_KEYS}, layers=1, dtype="float32"), dict(seq=[_QUICK["seq"]])),
    ("cpu", "full"): (dict(_FULL, batch=2, dtype="float32"), dict(seq=[256, 1024])),
    ("cuda", "quick"): (dict(_FULL, dtype="bfloat16"), dict(seq=[256, 1024])),
    ("cuda", "full"): (dict(_FULL, hidden=2048, intermediate=5632, dtype="bfloat16"),
                       dict(seq=[256, 1024, 4096], dtype=["bfloat16", "float32"])),
}


def suite_subjects(config: dict, ctx) -> list:
    """LoRA (peer) and the QAT+LoRA variants, each a model's training step on fastft's default backends (the
    backends of the QAT ops are compared op by op in "hadamard" and "fake_quant")."""
    from fastft.dispatch import backend_for

    from .harness import DTYPES, forced_backend, model_step_subject

    args = argparse.Namespace(**config)
    names = ("lora", "qat+lora") if ctx.quick and not ctx.on_gpu else None  # --quick on a CPU: KV4 left out
    providers = build_providers(args, DTYPES[config["dtype"]], ctx.device, names)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    inputs = dict(input_ids=ids.to(ctx.device), labels=ids.to(ctx.device))
    counted = dict(flops_context=lambda: forced_backend("torch"))
    subjects: list = [model_step_subject("lora", backend_for("lora_linear", ctx.device), "peer", providers[0].model,
                                         inputs, **counted)]
    for provider in providers[1:]:
        subjects.append(model_step_subject(provider.name.replace(" ", "-"), backend_for("fake_quantize", ctx.device),
                                           "fastft", provider.model, inputs, **counted))
    subjects.append(_torchao_subject(args, DTYPES[config["dtype"]], ctx, inputs))
    return subjects


def _torchao_subject(args: argparse.Namespace, dtype: torch.dtype, ctx, inputs: dict):
    """The torchao fake-quant + PEFT LoRA step (:func:`torchao_peft_provider`), or a skipped row saying why not."""
    from .harness import Skipped, installed, missing_note, model_step_subject

    for package in ("torchao", "peft"):
        if not installed(package):
            return Skipped("torchao+peft", "eager", "peer", missing_note(package, "the torchao QAT + PEFT LoRA peer"))
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
    )
    provider = torchao_peft_provider(tf.LlamaForCausalLM(config).to(ctx.device, dtype), args.rank)
    return model_step_subject("torchao+peft", "eager", "peer", provider.model, inputs)


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """The QAT step benchmark of ``python -m benchmarks`` ("qat_step"); sweeps replaceable (tests)."""
    from .harness import Benchmark, layer_case, layer_estimate, sweep_of, sweep_points

    sweeps = sweeps or SUITE_SWEEPS

    def step_flops(p: dict) -> float:
        h, i, layers, tokens = p["hidden"], p["intermediate"], p["layers"], p["batch"] * p["seq"]
        return 4.0 * tokens * (layers * (4 * h * h + 3 * h * i) + p["vocab"] * h)

    def cases(ctx) -> list:
        base, variables = sweep_of("qat_step", sweeps, ctx)
        # fake quantization and rotations are elementwise: on a CPU they cost about as much again as the GEMMs
        return [layer_case("qat_step", point, x_names, build=suite_subjects, agreement=False,
                           estimate_s=lambda ctx, point=point: layer_estimate(step_flops(point), 4, ctx, 4.0))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("qat_step", cases, "a small Llama's training step: QAT+LoRA (W4A8, R1-R4; and KV4) vs LoRA",
                      tags=("step", "qat"))]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("qat_step", suite_benchmarks()))
