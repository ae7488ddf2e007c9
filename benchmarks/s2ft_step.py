"""One training step of a small Llama: fastft S²FT vs fastft LoRA (same trainable count) vs full fine-tuning.

    python -m benchmarks.s2ft_step --quick   # this module's benchmarks through the suite's command line
    python -m benchmarks.s2ft_step           # their full sweep (the suite's options apply: --only, --out, ...)

This module only declares its cases and how to run one; the command line, CSV, plots, summary and sanity
checks are the suite's (``benchmarks.suite``), the measurement procedure ``benchmarks.harness``'s. The text
below describes what the benchmarks measure (targets are reported by the summary's ratios, never asserted).

Providers, each on a copy of one randomly initialised LlamaForCausalLM (multi-head attention, 16 heads
of 64; vocabulary 2048 so that the run fits the shared machine's memory; the two LoRA providers share
the frozen base weights), all trained with AdamW:
  s2ft       fastft.S2FTConfig: one attention head (o_proj columns) and 72 of the 2816 FFN channels
             (down_proj columns) per layer: 1.00% of all parameters;
  lora-same  fastft.LoRAConfig on the same modules (o_proj, down_proj), rank chosen to match S²FT's
             trainable count as closely as a rank can;
  lora-all   fastft.LoRAConfig on every linear layer of the decoder, rank matched the same way;
  full       every parameter trains.

One step is ``loss = model(ids, labels=ids).loss; loss.backward(); optimizer.step();
optimizer.zero_grad(set_to_none=True)``. Measured side by side in one process (see
``fastft.measure``):
  time            median and p20/p80 of interleaved steps (after warm-up steps that also create the
                  optimizer state);
  saved for bwd   bytes autograd keeps for backward during the forward (parameters excluded);
  step peak       peak increase of live tensor bytes during one step (activations, gradients, temporaries);
  held            bytes held between steps: weights (each storage once) + optimizer state (+ S²FT's
                  initial slices, kept so unpatch(merge=False) can drop the training);
  peak total      held + step peak: what a GPU's max_memory_allocated would show for the step;
  GFLOP           FlopCounterMode FLOPs of forward + backward (fastft's ops through their reference code).
Beside the steps, one down_proj-shaped layer alone, forward + backward, is timed interleaved ("s2ft"): fastft
S²FT against fastft LoRA and PEFT SHiRA with about as many trainable entries, the same math in plain PyTorch
(eager, and ``torch.compile`` of it in the full sweep) and the frozen layer: there the differences are not
diluted by the rest of the step.
The S²FT slice-gradient FLOPs are counted per patched module by running the op's backward for the
weight gradient alone, and compared with the full weight gradient of the same module (gᵀx, counted
the same way): they must equal (slice width / full width) of it, exactly.

Targets of the issue, reported (never asserted): S²FT's peak memory and step time below LoRA's (both
LoRA variants); slice dW FLOPs = slice fraction of the full dW FLOPs. Timings on a shared CPU are
noisy: the 1-minute load average is printed with them. Byte and FLOP counts are exact.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import sys
from dataclasses import dataclass

import torch
from torch import nn

import fastft
from fastft.nn import LoRALinear, S2FTLinear
from fastft.ops.s2ft_linear import s2ft_backward_reference

from fastft import measure


# S²FT: one head and ffn_ratio of the channels per layer, about 1.0% of all parameters in both variants
FULL = dict(hidden=1024, intermediate=2816, layers=4, heads=16, seq=512, batch=2, vocab=2048, repeats=5, warmup=2,
            attn_ratio=0.0625, ffn_ratio=0.0256)
QUICK = dict(hidden=256, intermediate=704, layers=2, heads=16, seq=128, batch=2, vocab=1024, repeats=5, warmup=2,
             attn_ratio=0.0625, ffn_ratio=0.036)


@dataclass
class Provider:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: int
    detail: str


def build_base(args: argparse.Namespace) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(config).float().train()


def lora_rank_for(model: nn.Module, targets, count: int) -> int:
    """The LoRA rank whose trainable count on ``targets`` is closest to ``count``."""
    per_rank = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            leaf = name.rsplit(".", 1)[-1]
            if targets == "all-linear" or leaf in targets:
                per_rank += module.in_features + module.out_features
    return max(1, round(count / per_rank))


def build_providers(args: argparse.Namespace,
                    names: tuple[str, ...] | None = None) -> tuple[list[Provider], str, nn.Module]:
    """S²FT, LoRA on the same modules and on every linear layer, full fine-tuning (only ``names`` besides S²FT,
    when given), each on its copy of one Llama; returns them, S²FT's patch report and S²FT's model."""
    base = build_base(args)
    total = sum(p.numel() for p in base.parameters())
    providers = []
    full_model = copy.deepcopy(base) if names is None or "full" in names else None  # every parameter trains

    s2ft_model = copy.deepcopy(base)
    report = fastft.patch(s2ft_model, fastft.S2FTConfig(ffn_ratio=args.ffn_ratio, attn_ratio=args.attn_ratio))
    s2ft_count = report.trainable_params
    providers.append(Provider("s2ft", s2ft_model, _adamw(s2ft_model), s2ft_count,
                              f"attn_ratio={args.attn_ratio:g}, ffn_ratio={args.ffn_ratio:g}"))

    for name, targets in (("lora-same", ["o_proj", "down_proj"]), ("lora-all", "all-linear")):
        if names is not None and name not in names:
            continue
        rank = lora_rank_for(base, targets, s2ft_count)
        # the LoRA models share the frozen base weights (neither modifies them): less memory for the run
        model = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
        lora_report = fastft.patch(model, fastft.LoRAConfig(r=rank, alpha=2 * rank, targets=targets))
        with torch.no_grad():  # B starts at zero; a non-zero B makes every product of the update matter
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_B.normal_(0.0, 0.02)
        providers.append(Provider(name, model, _adamw(model), lora_report.trainable_params,
                                  f"r={rank} on {targets if isinstance(targets, str) else '+'.join(targets)}"))

    if full_model is not None:
        providers.append(Provider("full", full_model, _adamw(full_model), total, "all parameters"))
    return providers, str(report), s2ft_model


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def make_step(provider: Provider, ids: torch.Tensor):
    model, optimizer = provider.model, provider.optimizer

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def held_bytes(provider: Provider) -> int:
    """Weights (each storage once) + optimizer state + S²FT's remembered initial slices."""
    storages = {}
    for tensor in [*provider.model.parameters(), *provider.model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    for module in provider.model.modules():
        if isinstance(module, S2FTLinear) and module.initial_slice is not None:
            storages[module.initial_slice.untyped_storage().data_ptr()] = module.initial_slice.untyped_storage().nbytes()
    for state in provider.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def slice_grad_flops(model: nn.Module, tokens: int) -> tuple[int, int, int, int]:
    """(slice dW FLOPs, full dW FLOPs of the same modules, slice entries, full entries), counted per module."""
    sliced = full = slice_entries = full_entries = 0
    for module in model.modules():
        if not isinstance(module, S2FTLinear):
            continue
        O, K, S = module.out_features, module.in_features, module.width
        g = torch.zeros(tokens, O)
        saved = torch.zeros(tokens, K if module.rows else S)
        weight = torch.zeros(O, K)
        sliced += measure.flops(lambda: s2ft_backward_reference(g, saved, weight, S, module.rows, False, True))
        x = torch.zeros(tokens, K)
        full += measure.flops(lambda: g.t() @ x)
        slice_entries += module.weight_slice.numel()
        full_entries += O * K
    return sliced, full, slice_entries, full_entries


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS between phases (glibc keeps them otherwise), so
    the run's resident memory stays near what is live. Never called inside a timed or measured step."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs two S²FT benchmarks (no PEFT counterpart exists: the peer is LoRA, fastft's, with
# about as many trainable parameters):
#   "s2ft"       one down_proj-shaped layer (tokens × intermediate -> hidden), forward + backward: fastft S²FT
#                (``ffn_ratio`` of the input columns train) on every backend that runs here, ``lora`` (the peer,
#                rank matched to the slice's entries) and the frozen layer (floor);
#   "s2ft_step"  one training step (forward + backward; the optimizer is left out) of a small Llama: fastft
#                S²FT vs ``lora-same`` (LoRA on o_proj + down_proj, rank matched), ``lora-all`` (every linear layer,
#                rank matched; not in the CPU --quick sweep) and ``full`` fine-tuning, all peers.
LAYER_SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(tokens=256, hidden=512, intermediate=1408, ffn_ratio=0.05, dtype="float32"),
                       dict(ffn_ratio=[0.05])),
    ("cpu", "full"): (dict(tokens=1024, hidden=1024, intermediate=2816, ffn_ratio=0.05, dtype="float32"),
                      dict(ffn_ratio=[0.01, 0.05, 0.2], tokens=[256, 1024, 4096], dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(tokens=8192, hidden=4096, intermediate=14336, ffn_ratio=0.05, dtype="bfloat16"),
                        dict(ffn_ratio=[0.01, 0.05])),
    ("cuda", "full"): (dict(tokens=8192, hidden=4096, intermediate=14336, ffn_ratio=0.05, dtype="bfloat16"),
                       dict(ffn_ratio=[0.01, 0.05, 0.2], tokens=[2048, 8192, 32768], dtype=["bfloat16", "float32"])),
}
_STEP_KEYS = ("hidden", "intermediate", "layers", "heads", "seq", "batch", "vocab", "attn_ratio", "ffn_ratio")
STEP_SUITE_SWEEPS = {
    ("cpu", "quick"): (dict({k: QUICK[k] for k in _STEP_KEYS}, seq=64), dict(seq=[64])),
    ("cpu", "full"): (dict({k: FULL[k] for k in _STEP_KEYS}, seq=256), dict(seq=[256])),
    ("cuda", "quick"): ({k: FULL[k] for k in _STEP_KEYS}, dict(seq=[FULL["seq"]])),
    ("cuda", "full"): ({k: FULL[k] for k in _STEP_KEYS}, dict(seq=[512, 2048], batch=[2, 8])),
}


def layer_subjects(config: dict, ctx) -> list:
    """fastft S²FT (each backend); peers with about as many trainable entries: fastft LoRA, PEFT SHiRA, the same
    math in plain PyTorch (eager, and torch.compile of it); the frozen layer (floor)."""
    from .harness import DTYPES, Subject, compiled_peer, fastft_backends, forced_backend

    tokens, features, out = config["tokens"], config["intermediate"], config["hidden"]
    dtype, device = DTYPES[config["dtype"]], ctx.device
    width = max(1, round(config["ffn_ratio"] * features))
    rank = max(1, round(width * out / (features + out)))
    torch.manual_seed(0)
    frozen = nn.Linear(features, out, bias=False).to(device, dtype).requires_grad_(False)
    s2ft = S2FTLinear.from_linear(copy.deepcopy(frozen), width)
    lora = LoRALinear.from_linear(frozen, fastft.LoRAConfig(r=rank, alpha=2 * rank))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; a non-zero B makes every product of the update matter
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.02)
    x = torch.randn(tokens, features, generator=gen).to(device, dtype).requires_grad_(True)
    g = torch.randn(tokens, out, generator=gen).to(device, dtype)
    backends, skipped = fastft_backends(s2ft.op, device)
    subjects: list = [
        Subject("fastft", backend, "fastft", lambda: s2ft(x), g, [x, s2ft.weight_slice], s2ft,
                context=lambda backend=backend: forced_backend(backend), flops_context=lambda: forced_backend("torch"))
        for backend in backends
    ] + skipped
    subjects.append(Subject("lora", "torch", "peer", lambda: lora(x), g, [x, lora.lora_A, lora.lora_B], lora,
                            context=lambda: forced_backend("torch")))
    # the layer's math in plain PyTorch (the trained columns a leaf of their own, the rest frozen), eager and compiled
    w_slice = frozen.weight[:, :width].detach().clone().requires_grad_(True)
    w_rest = frozen.weight[:, width:].detach().clone()
    subjects.append(Subject("pytorch", "eager", "peer", lambda: plain_s2ft(x, w_slice, w_rest), g, [x, w_slice],
                            [w_slice, w_rest]))
    subjects.append(compiled_peer(ctx, plain_s2ft, (x, w_slice, w_rest), g, [x, w_slice], [w_slice, w_rest],
                                  what="the S²FT layer's plain PyTorch math"))
    subjects.append(shira_subject(frozen, rank, x, g))
    subjects.append(Subject("frozen", "eager", "floor", lambda: frozen(x), g, [x], frozen))
    return subjects


def plain_s2ft(x: torch.Tensor, w_slice: torch.Tensor, w_rest: torch.Tensor) -> torch.Tensor:
    """``x [W_s | W_rest]ᵀ`` with W_s (the first columns) trainable: what one writes in plain PyTorch (autograd
    forms the full weight gradient and keeps its slice)."""
    return torch.nn.functional.linear(x, torch.cat([w_slice, w_rest], dim=1))


def shira_subject(frozen: nn.Linear, rank: int, x: torch.Tensor, g: torch.Tensor):
    """PEFT's SHiRA on a copy of ``frozen``: a sparse high-rank adapter of ``rank * (in + out)`` trainable entries
    (about the S²FT slice's count), or a skipped row saying why it cannot run."""
    from .harness import Skipped, Subject, installed, missing_note, not_run_here
    from .host_overhead import OneLinear

    if not installed("peft"):
        return Skipped("peft-shira", "eager", "peer", missing_note("peft", "the PEFT SHiRA peer"))
    try:
        from peft import ShiraConfig, get_peft_model
    except ImportError:
        return not_run_here("peft-shira", "eager", "peer", "this PEFT has no SHiRA (peft >= 0.17)")
    model = get_peft_model(OneLinear(copy.deepcopy(frozen)), ShiraConfig(r=rank, target_modules=["proj"],
                                                                         random_seed=0))
    layer = model.base_model.model.proj
    params = [p for p in layer.parameters() if p.requires_grad]
    return Subject("peft-shira", "eager", "peer", lambda: layer(x), g, [x, *params], layer)


def step_subjects(config: dict, ctx) -> list:
    """One training step of each provider of :func:`build_providers` (S²FT, LoRA same modules / all, full), on
    fastft's default backends (the "s2ft" benchmark compares the op's backends)."""
    from fastft.dispatch import backend_for

    from .harness import Measurement, forced_backend, model_step_subject

    args = argparse.Namespace(**config)
    names = ("lora-same", "full") if ctx.quick and not ctx.on_gpu else None  # --quick on a CPU: lora-all left out
    providers, _, _ = build_providers(args, names)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids.to(ctx.device), labels=ids.to(ctx.device))
    counted = dict(flops_context=lambda: forced_backend("torch"))
    subjects: list = []
    extra: list = []
    for provider in providers:
        provider.model.to(ctx.device)
        if provider.name == "s2ft":
            backend = backend_for("s2ft_linear", ctx.device)
            subjects.append(model_step_subject("fastft", backend, "fastft", provider.model, inputs, **counted))
            sliced, full, slice_entries, full_entries = slice_grad_flops(provider.model, args.batch * args.seq)
            note = (f"the S²FT modules' slice dW: {sliced:,} FLOPs of the full dW's {full:,}; it must equal the slice's "
                    f"share of the weights, {slice_entries:,} / {full_entries:,} entries")
            extra += [Measurement("fastft", backend, "fastft", "backward", "slice_dw_flops", "flop", sliced, note=note),
                      Measurement("fastft", backend, "fastft", "backward", "slice_dw_share", "ratio", sliced / full,
                                  note=note),
                      Measurement("fastft", backend, "fastft", "backward", "slice_entry_share", "ratio",
                                  slice_entries / full_entries, note=note)]
        else:
            backend = backend_for("lora_linear", ctx.device) if provider.name.startswith("lora") else "eager"
            subjects.append(model_step_subject(provider.name, backend, "peer", provider.model, inputs, **counted))
    return subjects, extra


def _llama_step_flops(config: dict) -> float:
    """Rough FLOPs of a full fine-tuning step of the small Llama (6 per parameter-token, plus attention)."""
    h, i, layers, v = config["hidden"], config["intermediate"], config["layers"], config["vocab"]
    tokens = config["batch"] * config["seq"]
    params = layers * (4 * h * h + 3 * h * i) + v * h
    return 6.0 * params * tokens + 12.0 * tokens * config["seq"] * h * layers


def suite_benchmarks(layer_sweeps: dict | None = None, step_sweeps: dict | None = None) -> list:
    """The S²FT benchmarks of ``python -m benchmarks`` ("s2ft", "s2ft_step"); sweeps replaceable (tests)."""
    from .harness import COMPILE_SECONDS, Benchmark, layer_case, layer_estimate, sweep_of, sweep_points

    def family(op: str, table: dict, build, flops, providers: int, agreement: bool, compiles: bool = False):
        def cases(ctx) -> list:
            base, variables = sweep_of(op, table, ctx)
            return [layer_case(op, point, x_names, build=build, agreement=agreement,
                               estimate_s=lambda ctx, point=point: layer_estimate(flops(point), providers, ctx)
                               + (COMPILE_SECONDS if compiles and ctx.compile else 0.0))
                    for point, x_names in sweep_points(base, variables)]

        return cases

    layer_flops = lambda p: 4.0 * p["tokens"] * p["hidden"] * p["intermediate"]  # noqa: E731
    return [
        Benchmark("s2ft", family("s2ft", layer_sweeps or LAYER_SUITE_SWEEPS, layer_subjects, layer_flops, 5, False, True),
                  "one S²FT linear layer (a slice of down_proj's columns trains) vs LoRA, forward + backward",
                  tags=("layer",)),
        Benchmark("s2ft_step", family("s2ft_step", step_sweeps or STEP_SUITE_SWEEPS, step_subjects,
                                      _llama_step_flops, 4, False),
                  "a small Llama's training step: S²FT vs LoRA vs full fine-tuning", tags=("step",)),
    ]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("s2ft_step", suite_benchmarks()))
