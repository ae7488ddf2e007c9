"""Partial-backprop policies on a small Llama: one training step under each policy vs full fine-tuning.

    python -m benchmarks.partial_backprop --quick   # this module's benchmarks through the suite's command line
    python -m benchmarks.partial_backprop           # their full sweep (the suite's options apply: --only, --out, ...)

This module only declares its cases and how to run one; the command line, CSV, plots, summary and sanity
checks are the suite's (``benchmarks.suite``), the measurement procedure ``benchmarks.harness``'s. The text
below describes what the benchmarks measure (targets are reported by the summary's ratios, never asserted).

Providers, all on one model (same weights), switching only which parameters require grad:
  full         every parameter trains (the peer: full fine-tuning);
  layers       ``select_trainable(model, "layers", layers=<top half>)``;
  half         ``select_trainable(model, "half", seed=0)`` (Half Fine-Tuning);
  flops@B      ``select_trainable(model, "flops", budget=B, batch=...)`` (GreenTrainer), B = 0.5 and 0.25.
A step is ``model(x, labels=x).loss.backward()`` with every gradient dropped first (so each provider
allocates the gradients it needs), and the policy's backward cut installed as ``select_trainable`` does.

Measured per provider, side by side in one process (``fastft.measure`` defines each):
  backward FLOPs   the report's analytic count and FlopCounterMode's on a real backward (they must agree);
  time             forward+backward wall time, interleaved (median, p20, p80), and its ratio to full;
  peak live        peak bytes of tensors alive during the step (activations, gradients), ratio to full.
Targets, reported never asserted: each report's FLOPs equal FlopCounterMode's; ``flops@B`` within B of full
fine-tuning's backward FLOPs; every policy's backward FLOPs, time and peak below full fine-tuning's.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fastft
from fastft.policies import build_context, selection_state
from fastft.policies.cut import BackwardCut

from fastft import measure


QUICK = dict(hidden=256, intermediate=704, layers=4, heads=4, vocab=1024, seq=128, batch=2, repeats=3, warmup=1)
BUDGETS = (0.5, 0.25)


@dataclass
class Provider:
    name: str
    trainable: set[int]  # ids of the parameters that train
    cut: nn.Module | None
    report_flops: int
    budget: float | None = None


def build_model(args: argparse.Namespace) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(config).train()


def providers(model: nn.Module, batch: torch.Tensor, n_layers: int,
              budgets: tuple[float, ...] = BUDGETS) -> tuple[list[Provider], list[str]]:
    """Each policy's choice (taken with select_trainable, then undone), and the printed reports."""
    everything = {id(p) for p in model.parameters()}
    full = build_context(model, batch).backward_flops(range(len(list(model.parameters()))))
    out = [Provider("full", everything, None, full)]
    reports = []
    runs = [("layers", "layers", dict(layers=list(range(n_layers // 2, n_layers))), None),
            ("half", "half", dict(seed=0), None)]
    runs += [(f"flops@{b}", "flops", dict(budget=b), b) for b in budgets]
    for name, policy, kwargs, budget in runs:
        report = fastft.select_trainable(model, policy, batch=batch, **kwargs)
        state = selection_state(model)
        cut = None if state.cut is None else state.cut.module
        out.append(Provider(name, {id(p) for p in model.parameters() if p.requires_grad}, cut,
                            report.backward_flops, budget))
        assert report.full_backward_flops == full
        reports.append(str(report))
        fastft.unselect(model)
    return out, reports


def make_step(model: nn.Module, provider: Provider, batch: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.requires_grad_(id(p) in provider.trainable)
            p.grad = None
        cut = None if provider.cut is None else BackwardCut(provider.cut)
        try:
            model(batch, labels=batch).loss.backward()
        finally:
            if cut is not None:
                cut.remove()

    return step


def measured_backward_flops(model: nn.Module, provider: Provider, batch: torch.Tensor) -> int:
    for p in model.parameters():
        p.requires_grad_(id(p) in provider.trainable)
        p.grad = None
    cut = None if provider.cut is None else BackwardCut(provider.cut)
    try:
        loss = model(batch, labels=batch).loss
        return measure.flops(lambda: loss.backward())
    finally:
        if cut is not None:
            cut.remove()


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs "partial_backprop": one training step (forward + backward) of a small Llama
# under each policy's choice (fastft: layers, half, flops@B) against full fine-tuning (the peer), on one model
# whose requires_grad flags and backward cut switch per provider. Besides the suite's measurements, each
# policy's report FLOPs (select_trainable's analytic count) are recorded as "flops_report" (backward) beside
# the FlopCounterMode count of the same backward ("flops", backward): they must be equal.
QUICK_BUDGETS = (0.5,)  # the CPU quick sweep: one GreenTrainer budget


def suite_budgets(ctx) -> tuple[float, ...]:
    return QUICK_BUDGETS if ctx.quick and not ctx.on_gpu else BUDGETS

SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(hidden=128, intermediate=352, layers=2, heads=4, vocab=512, seq=64, batch=2),
                       dict(seq=[64])),
    ("cpu", "full"): (dict(hidden=512, intermediate=1408, layers=4, heads=8, vocab=8192, seq=256, batch=2),
                      dict(seq=[128, 256], layers=[4, 8])),
    ("cuda", "quick"): (dict(hidden=1024, intermediate=2816, layers=4, heads=16, vocab=8192, seq=512, batch=2),
                        dict(seq=[512])),
    ("cuda", "full"): (dict(hidden=2048, intermediate=5632, layers=8, heads=16, vocab=32000, seq=1024, batch=4),
                       dict(seq=[512, 2048], layers=[8, 16])),
}


@contextlib.contextmanager
def _chosen(model: nn.Module, provider: Provider):
    """Inside the block only ``provider``'s parameters require grad, behind its backward cut."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(id(p) in provider.trainable)
    cut = None if provider.cut is None else BackwardCut(provider.cut)
    try:
        yield
    finally:
        if cut is not None:
            cut.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def suite_subjects(config: dict, ctx):
    from .harness import Measurement, model_step_subject

    args = argparse.Namespace(**config)
    model = build_model(args).to(ctx.device)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = batch.to(ctx.device)
    chosen, _ = providers(model, batch, args.layers, suite_budgets(ctx))
    inputs = dict(input_ids=batch, labels=batch)
    subjects, extra = [], []
    for provider in chosen:
        role = "peer" if provider.name == "full" else "fastft"
        grads = [p for p in model.parameters() if id(p) in provider.trainable]
        subjects.append(model_step_subject(provider.name, "torch", role, model, inputs, grads,
                                           context=lambda provider=provider: _chosen(model, provider)))
        extra.append(Measurement(provider.name, "torch", role, "backward", "flops_report", "flop",
                                 provider.report_flops, note="select_trainable's analytic backward FLOPs"))
        extra.append(Measurement(provider.name, "torch", role, "step", "trainable_params", "params",
                                 sum(p.numel() for p in grads)))
    return subjects, extra


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """The partial-backprop benchmark of ``python -m benchmarks`` ("partial_backprop"); sweeps replaceable."""
    from .harness import Benchmark, layer_case, layer_estimate, sweep_of, sweep_points

    sweeps = sweeps or SUITE_SWEEPS

    def step_flops(p: dict) -> float:
        h, i, layers, tokens = p["hidden"], p["intermediate"], p["layers"], p["batch"] * p["seq"]
        return 6.0 * tokens * (layers * (4 * h * h + 3 * h * i) + 2 * p["vocab"] * h)

    def cases(ctx) -> list:
        base, variables = sweep_of("partial_backprop", sweeps, ctx)
        return [layer_case("partial_backprop", point, x_names, build=suite_subjects, agreement=False,
                           estimate_s=lambda ctx, point=point: layer_estimate(
                               step_flops(point), 3 + len(suite_budgets(ctx)), ctx))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("partial_backprop", cases, "a small Llama's training step under each selection policy "
                      "(layers, half, GreenTrainer flops@B) vs full fine-tuning", tags=("step", "policy"))]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("partial_backprop", suite_benchmarks()))
