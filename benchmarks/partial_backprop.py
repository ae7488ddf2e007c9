"""Partial-backprop policies on a small Llama: one training step under each policy vs full fine-tuning.

    python -m benchmarks.partial_backprop                        # hidden 1024, 4 layers, 2x512 tokens, fp32
    python -m benchmarks.partial_backprop --quick                # small shapes, under a minute
    python -m benchmarks.partial_backprop --csv partial.csv      # also one CSV row per measurement

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
import csv
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fastft
from fastft.policies import build_context, selection_state
from fastft.policies.cut import BackwardCut

from fastft import measure

from . import cli

QUICK = dict(hidden=256, intermediate=704, layers=4, heads=4, vocab=1024, seq=128, batch=2, repeats=3, warmup=1)
BUDGETS = (0.5, 0.25)


@dataclass
class Provider:
    name: str
    trainable: set[int]  # ids of the parameters that train
    cut: nn.Module | None
    report_flops: int
    budget: float | None = None


@dataclass
class Result:
    provider: Provider
    measured_flops: int
    timing: measure.Timing
    peak_live_bytes: int


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


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(args: argparse.Namespace) -> tuple[list[Result], dict]:
    model = build_model(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    chosen, reports = providers(model, batch, args.layers)
    flops = {p.name: measured_backward_flops(model, p, batch) for p in chosen}
    steps = {p.name: make_step(model, p, batch) for p in chosen}
    peaks = {name: measure.peak_live_bytes(step) for name, step in steps.items()}
    load_before = _load_average()
    timings = measure.time_interleaved(steps, repeats=args.repeats, warmup=args.warmup)
    load_after = _load_average()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    results = [Result(p, flops[p.name], timings[p.name], peaks[p.name]) for p in chosen]
    params = {p.name: sum(q.numel() for q in model.parameters() if id(q) in p.trainable) for p in chosen}
    return results, dict(reports=reports, load=(load_before, load_after), threads=torch.get_num_threads(),
                         params=params)


def _fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: list[Result], context: dict, shape: str) -> str:
    full = results[0]
    header = ("provider", "trainable", "bwd GFLOP report", "bwd GFLOP counted", "x full", "median ms", "p20 ms",
              "p80 ms", "x full", "peak live", "x full")
    rows = []
    for r in results:
        t = r.timing
        rows.append((
            r.provider.name,
            f"{context['params'][r.provider.name]:,}",
            f"{r.provider.report_flops / 1e9:.3f}",
            f"{r.measured_flops / 1e9:.3f}",
            f"{r.measured_flops / full.measured_flops:.3f}",
            f"{t.median_s * 1e3:.0f}",
            f"{t.p20_s * 1e3:.0f}",
            f"{t.p80_s * 1e3:.0f}",
            f"{t.median_s / full.timing.median_s:.3f}",
            measure.format_bytes(r.peak_live_bytes),
            f"{r.peak_live_bytes / full.peak_live_bytes:.3f}",
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    first = full.timing
    out = [
        f"partial backprop, one training step: {shape}",
        f"machine: CPU, {context['threads']} threads, {os.cpu_count()} cores; {first.repeats} timed runs after "
        f"{first.warmup} warm-up, interleaved; torch {torch.__version__}; 1-min load average "
        f"{_fmt_load(context['load'][0])} before timing, {_fmt_load(context['load'][1])} after",
        line(header),
        line(tuple("-" * w for w in widths)),
        *(line(row) for row in rows),
        "",
    ]
    verdicts = []
    agree = all(r.provider.report_flops == r.measured_flops for r in results)
    verdicts.append(f"report FLOPs == FlopCounterMode for every provider: {'met' if agree else 'MISSED'}")
    for r in results:
        if r.provider.budget is not None:
            ok = r.measured_flops <= r.provider.budget * full.measured_flops
            verdicts.append(f"{r.provider.name} within budget: {'met' if ok else 'MISSED'} "
                            f"({r.measured_flops / full.measured_flops:.3f} <= {r.provider.budget})")
    for label, key in (("backward FLOPs", lambda r: r.measured_flops), ("time", lambda r: r.timing.median_s),
                       ("peak live", lambda r: r.peak_live_bytes)):
        below = [r.provider.name for r in results[1:] if key(r) < key(full)]
        missed = [r.provider.name for r in results[1:] if key(r) >= key(full)]
        verdicts.append(f"{label} below full: " + ("met" if not missed else f"MISSED for {missed}") +
                        f" ({len(below)}/{len(results) - 1})")
    out += [f"target: {v}" for v in verdicts]
    return "\n".join(out)


def write_csv(path: str, results: list[Result], args: argparse.Namespace, context: dict) -> None:
    fields = ["benchmark", "provider", "metric", "value", "unit", "hidden", "intermediate", "layers", "heads",
              "vocab", "seq", "batch", "threads", "device", "repeats", "warmup", "torch"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        common = dict(benchmark="partial_backprop", hidden=args.hidden, intermediate=args.intermediate,
                      layers=args.layers, heads=args.heads, vocab=args.vocab, seq=args.seq, batch=args.batch,
                      threads=context["threads"], device="cpu", repeats=args.repeats, warmup=args.warmup,
                      torch=torch.__version__)
        for r in results:
            metrics = [
                ("trainable_params", context["params"][r.provider.name], "params"),
                ("backward_flops_report", r.provider.report_flops, "flop"),
                ("backward_flops_counted", r.measured_flops, "flop"),
                ("time_median", r.timing.median_s, "s"),
                ("time_p20", r.timing.p20_s, "s"),
                ("time_p80", r.timing.p80_s, "s"),
                ("peak_live", r.peak_live_bytes, "bytes"),
            ]
            for metric, value, unit in metrics:
                writer.writerow(dict(common, provider=r.provider.name, metric=metric, value=value, unit=unit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.partial_backprop", description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    return cli.parse_standalone_args(parser, argv, QUICK, repeats=5, warmup=1)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    shape = (f"Llama hidden={args.hidden}, intermediate={args.intermediate}, layers={args.layers}, "
             f"heads={args.heads}, vocab={args.vocab}, tokens={args.batch}x{args.seq}, float32")
    results, context = run(args)
    for report in context["reports"]:
        print(report)
        print()
    print(format_table(results, context, shape))
    if args.csv:
        write_csv(args.csv, results, args, context)
        print(f"wrote {len(results) * 7} rows to {args.csv}")
    return results


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
    from .harness import Benchmark, layer_case, layer_estimate, sweep_points

    sweeps = sweeps or SUITE_SWEEPS

    def step_flops(p: dict) -> float:
        h, i, layers, tokens = p["hidden"], p["intermediate"], p["layers"], p["batch"] * p["seq"]
        return 6.0 * tokens * (layers * (4 * h * h + 3 * h * i) + 2 * p["vocab"] * h)

    def cases(ctx) -> list:
        key = (ctx.device.type, ctx.sweep)
        if key not in sweeps:
            raise ValueError(f"partial_backprop: no sweep for {key}; known: {sorted(sweeps)}")
        base, variables = sweeps[key]
        return [layer_case("partial_backprop", point, x_names, build=suite_subjects, agreement=False,
                           estimate_s=lambda ctx, point=point: layer_estimate(
                               step_flops(point), 3 + len(suite_budgets(ctx)), ctx))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("partial_backprop", cases, "a small Llama's training step under each selection policy "
                      "(layers, half, GreenTrainer flops@B) vs full fine-tuning", tags=("step", "policy"))]


if __name__ == "__main__":
    main(sys.argv[1:])
