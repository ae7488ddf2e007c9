"""A training step of a small Llama: plain fastft LoRA vs QAT+LoRA (fake-quantized base, rotations).

    python -m benchmarks.qat_step                     # hidden 512, 4 layers, batch 4 x 256 tokens, float32
    python -m benchmarks.qat_step --quick             # small shapes, a few seconds
    python -m benchmarks.qat_step --csv qat_step.csv  # also one CSV row per measurement

Providers, one copy of the same random Llama each, patched in one process:
  lora           fastft.LoRAConfig(r) on every decoder linear layer (the peer: what QAT adds cost to);
  qat+lora       the same LoRA plus fastft.QATConfig(w_bits=4, a_bits=8, rotations R1..R4): every linear
                 computes Q_a(x Q₄)·Q_w(W + s·BA)ᵀ, R3 rotates q and k inside attention;
  qat+lora kv4   the same with kv_bits=4 (keys and values fake-quantized inside attention).
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
import csv
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

import fastft

from fastft import measure

from . import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUICK = dict(hidden=128, intermediate=384, layers=2, heads=4, batch=2, seq=64, rank=8, repeats=5, warmup=1)


@dataclass
class Provider:
    name: str
    model: torch.nn.Module
    report: str


@dataclass
class Result:
    name: str
    timing: measure.Timing
    saved_bytes: int
    peak_live_bytes: int
    flops: int


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


def make_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for param in params:
            param.grad = None
        model(ids, labels=ids).loss.backward()

    return step


def make_forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        model(ids, labels=ids)

    return forward


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(args: argparse.Namespace) -> tuple[list[Result], dict]:
    dtype = DTYPES[args.dtype]
    providers = build_providers(args, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    steps = {p.name: make_step(p.model, ids) for p in providers}
    memory_and_flops = {
        p.name: (
            measure.saved_bytes(make_forward(p.model, ids), parameters=p.model),
            measure.peak_live_bytes(steps[p.name]),
            measure.flops(steps[p.name]),
        )
        for p in providers
    }
    load_before = _load_average()
    timings = measure.time_interleaved(steps, repeats=args.repeats, warmup=args.warmup)
    load_after = _load_average()
    results = [Result(name, timings[name], *memory_and_flops[name]) for name in steps]
    return results, dict(report=providers[1].report, threads=torch.get_num_threads(), load=(load_before, load_after))


def _fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: list[Result], context: dict, shape: str) -> str:
    peer = {r.name: r for r in results}["lora"]
    header = ("provider", "median ms", "p20 ms", "p80 ms", "x lora", "saved for bwd", "x lora", "peak live", "x lora",
              "GFLOP")
    rows = []
    for r in results:
        t = r.timing
        rows.append((
            r.name, f"{t.median_s * 1e3:.1f}", f"{t.p20_s * 1e3:.1f}", f"{t.p80_s * 1e3:.1f}",
            f"{t.median_s / peer.timing.median_s:.3f}",
            measure.format_bytes(r.saved_bytes), f"{r.saved_bytes / max(peer.saved_bytes, 1):.3f}",
            measure.format_bytes(r.peak_live_bytes), f"{r.peak_live_bytes / max(peer.peak_live_bytes, 1):.3f}",
            f"{r.flops / 1e9:.2f}",
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    first = results[0].timing
    return "\n".join([
        f"training step (forward + backward), QAT+LoRA vs LoRA: {shape}",
        f"machine: CPU, {context['threads']} threads, {os.cpu_count()} cores; {first.repeats} timed runs after "
        f"{first.warmup} warm-up, interleaved; torch {torch.__version__}; 1-min load average "
        f"{_fmt_load(context['load'][0])} before timing, {_fmt_load(context['load'][1])} after",
        line(header),
        line(tuple("-" * w for w in widths)),
        *(line(row) for row in rows),
    ])


def write_csv(path: str, results: list[Result], args: argparse.Namespace, threads: int) -> None:
    fields = ["benchmark", "provider", "metric", "value", "unit", "hidden", "intermediate", "layers", "batch", "seq",
              "rank", "dtype", "threads", "device", "repeats", "warmup", "torch"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        common = dict(benchmark="qat_step", hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                      batch=args.batch, seq=args.seq, rank=args.rank, dtype=args.dtype, threads=threads, device="cpu",
                      repeats=args.repeats, warmup=args.warmup, torch=torch.__version__)
        for r in results:
            for metric, value, unit in [
                ("time_median", r.timing.median_s, "s"), ("time_p20", r.timing.p20_s, "s"),
                ("time_p80", r.timing.p80_s, "s"), ("saved_for_backward", r.saved_bytes, "bytes"),
                ("peak_live", r.peak_live_bytes, "bytes"), ("flops", r.flops, "flop"),
            ]:
                writer.writerow(dict(common, provider=r.name, metric=metric, value=value, unit=unit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qat_step", description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536, help="a Hadamard size (R4): 2^n or K·2^n")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return cli.parse_standalone_args(parser, argv, QUICK, repeats=10, warmup=2)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    shape = (f"Llama hidden={args.hidden}, intermediate={args.intermediate}, layers={args.layers}, heads={args.heads}, "
             f"batch={args.batch}x{args.seq} tokens, LoRA r={args.rank}, {args.dtype}; QAT W4 per-channel A8 per-token, R1-R4")
    results, context = run(args)
    print(context["report"])
    print()
    print(format_table(results, context, shape))
    if args.csv:
        write_csv(args.csv, results, args, context["threads"])
        print(f"wrote {len(results) * 6} rows to {args.csv}")
    return results


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs "qat_step": one training step (forward + backward) of a small Llama with QAT+LoRA
# (W4 per channel, A8 per token, rotations R1-R4) and with keys/values fake-quantized to 4 bits as well
# ("qat+lora-kv4"; not in the CPU --quick sweep), against plain fastft LoRA of the same rank ("lora"). PEFT has no QAT: the peer is LoRA, and
# "fastft / best peer" is QAT's overhead over it. The providers compute different things on purpose (a
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
    return subjects


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """The QAT step benchmark of ``python -m benchmarks`` ("qat_step"); sweeps replaceable (tests)."""
    from .harness import Benchmark, layer_case, layer_estimate, sweep_points

    sweeps = sweeps or SUITE_SWEEPS

    def step_flops(p: dict) -> float:
        h, i, layers, tokens = p["hidden"], p["intermediate"], p["layers"], p["batch"] * p["seq"]
        return 4.0 * tokens * (layers * (4 * h * h + 3 * h * i) + p["vocab"] * h)

    def cases(ctx) -> list:
        key = (ctx.device.type, ctx.sweep)
        if key not in sweeps:
            raise ValueError(f"qat_step: no sweep for {key}; known: {sorted(sweeps)}")
        base, variables = sweeps[key]
        # fake quantization and rotations are elementwise: on a CPU they cost about as much again as the GEMMs
        return [layer_case("qat_step", point, x_names, build=suite_subjects, agreement=False,
                           estimate_s=lambda ctx, point=point: layer_estimate(step_flops(point), 3, ctx, 4.0))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("qat_step", cases, "a small Llama's training step: QAT+LoRA (W4A8, R1-R4; and KV4) vs LoRA",
                      tags=("step", "qat"))]


if __name__ == "__main__":
    main(sys.argv[1:])
