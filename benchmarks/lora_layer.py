"""One LoRA linear layer, forward + backward: frozen ``nn.Linear`` vs fastft ``LoRALinear`` vs PEFT LoRA.

    python -m benchmarks.lora_layer                      # tokens=2048, in=out=4096, r=16, float32
    python -m benchmarks.lora_layer --quick              # small shapes, a few seconds
    python -m benchmarks.lora_layer --csv lora_layer.csv # also one CSV row per measurement

It is also part of the suite (``python -m benchmarks``, see ``suite_benchmarks`` at the end): there over a
dense and a 4-bit base, across sweeps of shapes, on every fastft backend that runs on the machine.

The three providers share one weight W (out×in, frozen, no bias, as in Llama); fastft and PEFT carry the
same A (r×in) and B (out×r), both non-zero, with the same scale alpha/r. The input x requires grad, as it
does inside a network, and one step is ``y = layer(x); y.backward(g)`` with a fixed upstream gradient g.
Before each step the gradients of x, A and B are dropped, so no provider pays for accumulation.

Measured for each provider, side by side in one process (see ``fastft.measure`` for the definitions):
  time          forward+backward wall time: median and p20/p80 of interleaved runs, and its ratio to the
                frozen linear (the floor: LoRA cannot be cheaper) and to PEFT;
  saved         bytes autograd keeps for backward, parameters excluded, beside the floor for LoRA with a
                trainable A: x plus x·Aᵀ (N×in + N×r elements);
  peak live     peak increase of live tensor bytes during the step (x, W, g allocated before it);
  GFLOP         matmul FLOPs of the step (FlopCounterMode; fastft's custom op counted through its
                reference implementation).
Before measuring, fastft and PEFT are checked to give the same y, dx, dA and dB.

The issue's targets on CPU: fastft time within 1.05x of the frozen linear and below PEFT; fastft's saved
bytes no more than x + x·Aᵀ. They are reported, never asserted.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fastft

from fastft import measure

from . import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK = dict(tokens=256, features=512, rank=8, repeats=5, warmup=1)
TARGET_TIME_RATIO_TO_FROZEN = 1.05


class OneLinear(nn.Module):
    """A module holding one linear layer as ``proj``: what fastft.patch and PEFT both patch."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Provider:
    name: str
    layer: nn.Module
    adapter_params: list[nn.Parameter]


@dataclass
class Result:
    name: str
    timing: measure.Timing
    saved_bytes: int
    peak_live_bytes: int
    flops: int


def build_providers(features: int, rank: int, dtype: torch.dtype, seed: int = 0) -> tuple[list[Provider], str]:
    """The frozen linear, fastft LoRA and (if installed) PEFT LoRA over one shared weight.

    Returns the providers and the printed fastft patch report.
    """
    torch.manual_seed(seed)
    base = nn.Linear(features, features, bias=False, dtype=dtype)
    base.weight.requires_grad_(False)
    providers = [Provider("frozen", base, [])]

    fastft_holder = OneLinear(base)
    report = fastft.patch(fastft_holder, fastft.LoRAConfig(r=rank, alpha=2 * rank, targets=["proj"]))
    fastft_layer = fastft_holder.proj
    with torch.no_grad():  # B starts at zero; a non-zero B makes every product of the update matter
        fastft_layer.lora_B.normal_(0.0, 0.02)
    providers.append(Provider("fastft", fastft_layer, [fastft_layer.lora_A, fastft_layer.lora_B]))

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print('PEFT is not installed: the PEFT column is skipped (pip install "fastft[peft]").')
        return providers, str(report)
    peft_model = get_peft_model(
        OneLinear(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"])
    )
    peft_layer = peft_model.base_model.model.proj
    lora_A, lora_B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(fastft_layer.lora_A)
        lora_B.copy_(fastft_layer.lora_B)
    providers.append(Provider("peft", peft_layer, [lora_A, lora_B]))
    return providers, str(report)


def make_step(provider: Provider, x: torch.Tensor, grad_seed: torch.Tensor) -> Callable[[], None]:
    """One forward+backward of ``provider``'s layer, gradients of x and the adapters dropped first."""
    layer, params = provider.layer, provider.adapter_params

    def step() -> None:
        x.grad = None
        for param in params:
            param.grad = None
        layer(x).backward(grad_seed)

    return step


def make_forward(provider: Provider, x: torch.Tensor) -> Callable[[], None]:
    """The forward alone (builds the graph; what it saves is what backward will need)."""

    def forward() -> None:
        provider.layer(x)

    return forward


def check_agreement(providers: list[Provider], x: torch.Tensor, grad_seed: torch.Tensor) -> str:
    """Max abs differences between fastft and PEFT in y, dx, dA, dB (they must compute the same thing)."""
    by_name = {p.name: p for p in providers}
    if "peft" not in by_name:
        return "fastft vs PEFT: skipped (PEFT not installed)"
    outputs = {}
    for name in ("fastft", "peft"):
        provider = by_name[name]
        x.grad = None
        for param in provider.adapter_params:
            param.grad = None
        y = provider.layer(x)
        y.backward(grad_seed)
        outputs[name] = [y.detach(), x.grad.clone(), *(p.grad.clone() for p in provider.adapter_params)]
    x.grad = None
    parts = [
        f"{label} {(a.float() - b.float()).abs().max().item():.2e}"
        for label, a, b in zip(("y", "dx", "dA", "dB"), outputs["fastft"], outputs["peft"])
    ]
    return "fastft vs PEFT, max abs difference: " + ", ".join(parts)


def _load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores skew CPU timings)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def measure_providers(providers: list[Provider], x: torch.Tensor, grad_seed: torch.Tensor, repeats: int,
                      warmup: int) -> tuple[list[Result], tuple]:
    """Each provider's training step on ``x``: bytes saved for backward (parameters excluded), peak live
    bytes and FLOPs, then times with the providers interleaved; and the 1-minute load average before and
    after the timing."""
    steps = {p.name: make_step(p, x, grad_seed) for p in providers}
    memory_and_flops = {
        p.name: (
            measure.saved_bytes(make_forward(p, x), parameters=p.layer),
            measure.peak_live_bytes(steps[p.name]),
            measure.flops(steps[p.name]),
        )
        for p in providers
    }
    load_before = _load_average()
    timings = measure.time_interleaved(steps, repeats=repeats, warmup=warmup)
    load_after = _load_average()
    return [Result(name, timings[name], *memory_and_flops[name]) for name in steps], (load_before, load_after)


def run(tokens: int, features: int, rank: int, dtype: torch.dtype, repeats: int, warmup: int) -> tuple[list[Result], dict]:
    providers, report = build_providers(features, rank, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, features, generator=gen).to(dtype).requires_grad_(True)
    grad_seed = torch.randn(tokens, features, generator=gen).to(dtype)
    agreement = check_agreement(providers, x, grad_seed)

    results, (load_before, load_after) = measure_providers(providers, x, grad_seed, repeats, warmup)

    itemsize = torch.empty(0, dtype=dtype).element_size()
    context = dict(
        report=report,
        agreement=agreement,
        x_bytes=tokens * features * itemsize,
        xa_bytes=tokens * rank * itemsize,
        threads=torch.get_num_threads(),
        load=(load_before, load_after),
    )
    return results, context


def _fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: list[Result], context: dict, shape: str) -> str:
    by_name = {r.name: r for r in results}
    frozen = by_name["frozen"].timing.median_s
    peft = by_name["peft"].timing.median_s if "peft" in by_name else None
    floor = context["x_bytes"] + context["xa_bytes"]
    header = ("provider", "median ms", "p20 ms", "p80 ms", "x frozen", "x peft", "saved for bwd", "x + x·Aᵀ",
              "peak live", "GFLOP")
    rows = []
    for r in results:
        t = r.timing
        rows.append((
            r.name,
            f"{t.median_s * 1e3:.1f}",
            f"{t.p20_s * 1e3:.1f}",
            f"{t.p80_s * 1e3:.1f}",
            f"{t.median_s / frozen:.3f}",
            "-" if peft is None else f"{t.median_s / peft:.3f}",
            measure.format_bytes(r.saved_bytes),
            "-" if r.name == "frozen" else measure.format_bytes(floor),
            measure.format_bytes(r.peak_live_bytes),
            f"{r.flops / 1e9:.2f}",
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    first = results[0].timing
    out = [
        f"LoRA layer, forward+backward: {shape}",
        f"machine: CPU, {context['threads']} threads, {os.cpu_count()} cores; {first.repeats} timed runs after "
        f"{first.warmup} warm-up, interleaved; torch {torch.__version__}; 1-min load average "
        f"{_fmt_load(context['load'][0])} before timing, {_fmt_load(context['load'][1])} after",
        line(header),
        line(tuple("-" * w for w in widths)),
        *(line(row) for row in rows),
        "",
        f"x + x·Aᵀ, what LoRA with a trainable A must save: {measure.format_bytes(context['x_bytes'])} + "
        f"{measure.format_bytes(context['xa_bytes'])} = {measure.format_bytes(floor)} ({floor:,} bytes)",
        context["agreement"],
    ]
    fastft_result = by_name["fastft"]
    ratio = fastft_result.timing.median_s / frozen
    verdicts = [
        f"time within {TARGET_TIME_RATIO_TO_FROZEN}x of frozen: {'met' if ratio <= TARGET_TIME_RATIO_TO_FROZEN else 'MISSED'} ({ratio:.3f}x)",
    ]
    if peft is not None:
        below = fastft_result.timing.median_s < peft
        verdicts.append(f"below PEFT: {'met' if below else 'MISSED'} ({fastft_result.timing.median_s / peft:.3f}x)")
    saved_ok = fastft_result.saved_bytes <= floor
    verdicts.append(
        f"saved <= x + x·Aᵀ: {'met' if saved_ok else 'MISSED'} ({fastft_result.saved_bytes:,} vs {floor:,} bytes)"
    )
    out.append("fastft targets: " + "; ".join(verdicts))
    return "\n".join(out)


def write_csv(path: str, results: list[Result], args: argparse.Namespace, threads: int) -> None:
    """Append one row per (provider, metric) to ``path`` (header written when the file is new)."""
    fields = ["benchmark", "provider", "metric", "value", "unit", "tokens", "features", "rank", "dtype",
              "threads", "device", "repeats", "warmup", "torch"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        common = dict(benchmark="lora_layer", tokens=args.tokens, features=args.features, rank=args.rank,
                      dtype=args.dtype, threads=threads, device="cpu", repeats=args.repeats, warmup=args.warmup,
                      torch=torch.__version__)
        for r in results:
            metrics = [
                ("time_median", r.timing.median_s, "s"),
                ("time_p20", r.timing.p20_s, "s"),
                ("time_p80", r.timing.p80_s, "s"),
                ("saved_for_backward", r.saved_bytes, "bytes"),
                ("peak_live", r.peak_live_bytes, "bytes"),
                ("flops", r.flops, "flop"),
            ]
            for metric, value, unit in metrics:
                writer.writerow(dict(common, provider=r.name, metric=metric, value=value, unit=unit))


def profile_ops(providers_steps: dict[str, Callable[[], None]], rows: int = 12) -> str:
    """Per-op CPU time of one step of each provider (torch.profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name, step in providers_steps.items():
        step()  # warm
        with measure._quiet_native_stderr():
            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            prof.start()
        step()
        with measure._quiet_native_stderr():
            prof.stop()
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)
        out.append(f"--- {name}\n{table}")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_layer", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (batch × sequence)")
    parser.add_argument("--features", type=int, default=4096, help="in = out features of the layer")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--profile", action="store_true", help="also print the per-op CPU time of one step each")
    return cli.parse_standalone_args(parser, argv, QUICK, repeats=10, warmup=2)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    shape = f"tokens={args.tokens}, in=out={args.features}, r={args.rank}, {args.dtype}, no bias"
    results, context = run(args.tokens, args.features, args.rank, dtype, args.repeats, args.warmup)
    print(context["report"])
    print()
    print(format_table(results, context, shape))
    if args.csv:
        write_csv(args.csv, results, args, context["threads"])
        print(f"wrote {len(results) * 6} rows to {args.csv}")
    if args.profile:
        providers, _ = build_providers(args.features, args.rank, dtype)
        x = torch.randn(args.tokens, args.features).to(dtype).requires_grad_(True)
        g = torch.randn(args.tokens, args.features).to(dtype)
        print(profile_ops({p.name: make_step(p, x, g) for p in providers}))
    return results


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
    from .harness import DTYPES, Skipped, Subject, fastft_backends, forced_backend, installed, missing_note

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
    from .harness import layer_case, layer_estimate, sweep_points

    def cases(ctx) -> list:
        key = (ctx.device.type, ctx.sweep)
        if key not in sweeps:
            raise ValueError(f"{op}: no sweep for {key}; known: {sorted(sweeps)}")
        base, variables = sweeps[key]
        providers = 5 if ctx.on_gpu else 4
        slowdown = 2.0 if quantized else 1.0  # dequantizing the 4-bit weight on every pass
        return [
            layer_case(
                op, point, x_names,
                build=lambda config, ctx: suite_subjects(config, ctx, quantized),
                min_bytes=lambda config, mode: suite_min_bytes(config, mode, quantized),
                estimate_s=lambda ctx, point=point: layer_estimate(suite_step_flops(point), providers, ctx, slowdown),
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
    main(sys.argv[1:])
