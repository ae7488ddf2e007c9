"""One LoRA linear layer, forward + backward: frozen ``nn.Linear`` vs fastft ``LoRALinear`` vs PEFT LoRA.

    python -m benchmarks.lora_layer                      # tokens=2048, in=out=4096, r=16, float32
    python -m benchmarks.lora_layer --quick              # small shapes, a few seconds
    python -m benchmarks.lora_layer --csv lora_layer.csv # also one CSV row per measurement

The three providers share one weight W (out×in, frozen, no bias, as in Llama); fastft and PEFT carry the
same A (r×in) and B (out×r), both non-zero, with the same scale alpha/r. The input x requires grad, as it
does inside a network, and one step is ``y = layer(x); y.backward(g)`` with a fixed upstream gradient g.
Before each step the gradients of x, A and B are dropped, so no provider pays for accumulation.

Measured for each provider, side by side in one process (see ``benchmarks.measure`` for the definitions):
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

from . import measure

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


def run(tokens: int, features: int, rank: int, dtype: torch.dtype, repeats: int, warmup: int) -> tuple[list[Result], dict]:
    providers, report = build_providers(features, rank, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, features, generator=gen).to(dtype).requires_grad_(True)
    grad_seed = torch.randn(tokens, features, generator=gen).to(dtype)
    agreement = check_agreement(providers, x, grad_seed)

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
    results = [Result(name, timings[name], *memory_and_flops[name]) for name in steps]

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
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per provider")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"small shapes: {QUICK}")
    parser.add_argument("--csv", metavar="PATH", help="append one row per measurement to this CSV file")
    parser.add_argument("--profile", action="store_true", help="also print the per-op CPU time of one step each")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main(sys.argv[1:])
