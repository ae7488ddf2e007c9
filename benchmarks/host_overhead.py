"""Host overhead: one patched layer at 1 to 64 tokens, where Python, autograd and dispatch cost more than the math.

    python -m benchmarks.host_overhead --quick   # tokens 1 and 64 (the full sweep: 1, 2, 4, ... 64)
    python -m benchmarks --only host             # the same inside the suite

For every method's module (``host-lora``, ``host-dora``, ``host-qlora``, ``host-s2ft``, ``host-qat``) one layer
of ``hidden × hidden`` (no bias) runs forward, and forward + backward (x requires grad, as inside a network),
at a few token counts: fastft's module on its default backend, the peer a user would pick (PEFT LoRA / DoRA /
QLoRA, PEFT SHiRA for the sparse S²FT, torchao's fake-quantized linear for QAT) and the plain layer (the
floor: the frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` alone). At these sizes the figures are the
fixed cost per call of each implementation: what a small model on a GPU, bound by its host, pays per layer.
Only time is measured (many interleaved rounds: the calls take microseconds). On a CPU it is the calling
thread's CPU time with one intra-op thread, per call (5 calls a sample): on a shared machine wall time counts
the time other processes held the core, which swamps a call of microseconds.

Measured (host-lora, hidden 256, rank 16, float32, CPU, one thread, forward + backward per call; thread CPU
time, 200 interleaved rounds of 5 calls, median [p20–p80] in µs; each line one process, PEFT and the plain
layer timed beside fastft; 2-core machine shared with other jobs, load average 6.2–7.2 for the first four
lines, 1.2–1.3 for the last two), before and after the eager LoRA call skipped the custom-op machinery
(branch gpupath):

    tokens  fastft before        PEFT (same run)     fastft after         PEFT (same run)     plain linear
    1       988 [899–1092]       492 [389–545]       282 [244–377]        344 [282–468]       145 [102–199]
    1       942 [695–1054]       445 [296–528]       343 [245–451]        359 [271–524]       141 [93–184]
    64      1510 [1171–1631]     985 [741–1102]      638 [568–761]        689 [604–859]       403 [351–476]
    64      1150 [1025–1464]     722 [622–952]       803 [663–990]        878 [730–1088]      455 [374–535]
    1       800 [761–834]        418 [389–448]       349 [308–395]        380 [338–440]       141 [120–161]
    64      1263 [1196–1343]     810 [772–865]       759 [633–836]        812 [709–911]       415 [362–451]

fastft / PEFT (medians) at 1 token: 1.9–2.1× before, 0.82–0.95× after; at 64 tokens 1.53–1.59× before,
0.91–0.94× after. Where the time went before (cProfile): the custom op's Python dispatch (default filling, alias
checks, the dynamo-disable wrapper, redispatch) for forward and backward, ``os.environ`` reads and the
backend resolution on every call, no-op casts and reshapes in the layer, and a separate ``mul_`` per
scaled gradient.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

import fastft
from fastft import measure

from .harness import (Benchmark, Case, Measurement, Skipped, Subject, installed, missing_note, not_run_here,
                      time_checked, warm_up)

SWEEPS = {  # (device type, sweep): (hidden, token counts)
    ("cpu", "quick"): (256, [1, 64]),
    ("cpu", "full"): (256, [1, 2, 4, 8, 16, 32, 64]),
    ("cuda", "quick"): (1024, [1, 8, 64]),
    ("cuda", "full"): (1024, [1, 2, 4, 8, 16, 32, 64]),
}
METHODS = ("lora", "dora", "qlora", "s2ft", "qat")
RANK = 16
REPEATS = {"quick": 20, "full": 100}


class OneLinear(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _base(hidden: int, device: torch.device, quantized: bool) -> nn.Module:
    from .lora_layer import suite_base_layer

    return suite_base_layer(hidden, torch.float32, device, quantized)


def _peft(base: nn.Module, **config) -> tuple[nn.Module, list]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OneLinear(base), LoraConfig(target_modules=["proj"], lora_dropout=0.0, **config))
    layer = model.base_model.model.proj
    return layer, [p for p in layer.parameters() if p.requires_grad]


def layers(method: str, hidden: int, device: torch.device) -> list:
    """(provider, backend, role, module, trainable parameters) per provider, or Skipped entries."""
    from fastft.dispatch import backend_for

    quantized = method == "qlora"
    if quantized and not installed("bitsandbytes"):
        return [Skipped("fastft", "-", "fastft", missing_note("bitsandbytes", "host-qlora"))]
    base = _base(hidden, device, quantized)
    plain = ("plain", "bnb" if quantized else "eager", "floor", base, [])
    out: list = []
    if method in ("lora", "dora", "qlora"):
        holder = OneLinear(base)
        fastft.patch(holder, fastft.LoRAConfig(r=RANK, alpha=2 * RANK, targets=["proj"], dora=method == "dora"))
        layer = holder.proj
        out.append(("fastft", backend_for(layer.op, device), "fastft", layer,
                    [p for p in layer.parameters() if p.requires_grad]))
        if installed("peft"):
            out.append(("peft", "bnb" if quantized else "eager", "peer",
                        *_peft(base, r=RANK, lora_alpha=2 * RANK, use_dora=method == "dora")))
        else:
            out.append(Skipped("peft", "eager", "peer", missing_note("peft", "the PEFT provider")))
    elif method == "s2ft":
        from fastft.nn import S2FTLinear

        width = max(1, hidden // 32)
        layer = S2FTLinear.from_linear(copy.deepcopy(base), width)
        out.append(("fastft", backend_for(layer.op, device), "fastft", layer, [layer.weight_slice]))
        out.append(_shira(base, width, hidden))
    else:  # qat: W4 per channel, A8 per token
        from fastft.nn import QuantLinear

        dense = nn.Linear(hidden, hidden, bias=False).to(device)
        dense.load_state_dict(base.state_dict())
        layer = QuantLinear.from_linear(dense, fastft.QATConfig(w_bits=4, a_bits=8, rotations=()))
        out.append(("fastft", "default", "fastft", layer, [p for p in layer.parameters() if p.requires_grad]))
        out.append(_torchao_qat(base, hidden, device))
    return out + [plain]


def _shira(base: nn.Module, width: int, hidden: int):
    """PEFT's SHiRA (a sparse high-rank adapter with as many trainable entries as the S²FT slice)."""
    if not installed("peft"):
        return Skipped("peft-shira", "eager", "peer", missing_note("peft", "the PEFT SHiRA provider"))
    try:
        from peft import ShiraConfig, get_peft_model
    except ImportError:
        return not_run_here("peft-shira", "eager", "peer", "this PEFT has no SHiRA (peft >= 0.17)")
    # SHiRA trains r·(in + out) entries: r = width / 2 gives the S²FT slice's width·hidden entries
    model = get_peft_model(OneLinear(copy.deepcopy(base)), ShiraConfig(r=max(1, round(width / 2)),
                                                                       target_modules=["proj"]))
    layer = model.base_model.model.proj
    return ("peft-shira", "eager", "peer", layer, [p for p in layer.parameters() if p.requires_grad])


def _torchao_qat(base: nn.Module, hidden: int, device: torch.device):
    """torchao's fake-quantized linear (int4 per channel weights, int8 per token activations), base frozen."""
    if not installed("torchao"):
        return Skipped("torchao", "eager", "peer", missing_note("torchao", "the torchao fake-quant provider"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.linear import FakeQuantizedLinear
    layer = FakeQuantizedLinear(hidden, hidden, bias=False,
                                activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                                weight_config=IntxFakeQuantizeConfig(torch.int4, "per_channel")).to(device)
    with torch.no_grad():
        layer.weight.copy_(base.weight.float())
    return ("torchao", "eager", "peer", layer, [layer.weight])


def run_method(method: str, hidden: int, tokens: int, ctx) -> list[Measurement]:
    built = layers(method, hidden, ctx.device)
    out = [b.measurement() for b in built if isinstance(b, Skipped)]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(ctx.device).requires_grad_(True)
    g = torch.randn(tokens, hidden, generator=gen).to(ctx.device)
    subjects = [Subject(p, b, role, (lambda m=m: m(x)), g, [x, *params], m)
                for p, b, role, m, params in (t for t in built if not isinstance(t, Skipped))]
    if not subjects:
        return out
    warm_up([s.step_fn() for s in subjects], ctx)
    repeats = REPEATS[ctx.sweep]
    if not ctx.on_gpu:  # the calling thread's CPU time, one intra-op thread: what the call costs, not the load
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for mode in ("forward", "step"):
                calls = {s.label: (s.forward_fn() if mode == "forward" else s.step_fn()) for s in subjects}
                samples = thread_time_interleaved(calls, repeats)
                for s in subjects:
                    t = measure.timing_from_samples(samples[s.label], method="thread_time", threads=1)
                    out.append(Measurement(s.provider, s.backend, s.role, mode, "time", "s", t.median_s, t.p20_s,
                                           t.p80_s, note=f"thread CPU time, 1 thread: {repeats} interleaved rounds "
                                                          f"of {CALLS_PER_SAMPLE} calls, per call"))
        finally:
            torch.set_num_threads(threads)
        return out
    saved = ctx.repeats
    ctx.repeats = repeats
    try:
        for mode in ("forward", "step"):
            calls = {s.label: (s.forward_fn() if mode == "forward" else s.step_fn()) for s in subjects}
            timings, notes = time_checked(calls, ctx)
            for s in subjects:
                t = timings[s.label]
                note = f"perf_counter: {t.repeats} interleaved rounds of one call" + (
                    f"; {notes[s.label]}" if s.label in notes else "")
                out.append(Measurement(s.provider, s.backend, s.role, mode, "time", "s", t.median_s, t.p20_s, t.p80_s,
                                       note=note))
    finally:
        ctx.repeats = saved
    return out


CALLS_PER_SAMPLE = 5


def thread_time_interleaved(calls: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Per-call seconds of the calling thread's CPU time (``time.thread_time``), ``CALLS_PER_SAMPLE`` calls a sample,
    providers round-robin (rotated each round). On a shared CPU wall time also counts the time other processes
    held the core, which at these microsecond calls swamps the call; the thread's CPU time does not."""
    import time

    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            start = time.thread_time()
            for _ in range(CALLS_PER_SAMPLE):
                call()
            if index >= warmup:
                samples[name].append((time.thread_time() - start) / CALLS_PER_SAMPLE)
    return samples


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """``host_overhead``: a case per (method, token count); sweeps replaceable (tests)."""
    table = sweeps or SWEEPS

    def cases(ctx) -> list:
        hidden, token_counts = table[(ctx.device.type, ctx.sweep)]
        return [Case(f"host-{method}", dict(tokens=n, hidden=hidden, rank=RANK, dtype="float32"), ("tokens",),
                     lambda ctx, method=method, n=n: run_method(method, hidden, n, ctx),
                     estimate_s=lambda ctx: 1.5 * ctx.contention)
                for method in METHODS for n in token_counts]

    return [Benchmark("host_overhead", cases, "one patched layer at 1-64 tokens: the fixed host cost per call",
                      tags=("host", "layer"))]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("host_overhead", suite_benchmarks()))
