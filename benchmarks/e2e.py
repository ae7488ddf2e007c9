"""End to end: a small Llama trained a few steps with fastft and with its peer, each variant in its own process.

    python -m benchmarks --only e2e                                # through the suite (every method)
    python -m benchmarks.e2e --method lora --provider fastft       # one variant; prints one RESULT line (JSON)

The model, the data and the training loop are the demo's tiny ones (``fastft.demo``): a random-weight
``LlamaForCausalLM`` built from its config class, batches of a synthetic language (same seed, so the same
data for every variant), AdamW on the trainable parameters. Default: hidden 1024, intermediate 2816,
4 layers, 16 heads / 4 KV heads, vocab 32000, sequence 512, batch 2, 6 steps, LoRA r=16 alpha=32 on every
linear layer of the decoder layers (``--quick``: hidden 256, intermediate 704, 2 layers, sequence 128, vocab 2048,
4 steps).
float32 on a CPU, bfloat16 on a GPU (adapters float32, both libraries' rule).

Each variant runs in a fresh Python process, so its resident memory is its own. Both variants of a method
import the same libraries (peft when installed, bitsandbytes for QLoRA) before anything is measured.
Every variant starts from the same adapters: A drawn from a seeded generator (Kaiming-uniform, PEFT's and
fastft's default), B zero. Recorded per variant:

    time            wall time of a training step (forward + backward + AdamW), steps 2..N (the first
                    creates the optimizer state): median, p20, p80
    loss            the loss at every step (a curve) and ``final_loss`` after N steps: fastft and its peer
                    compute the same thing, so these agree to rounding
    rss_baseline    resident memory after the imports, before the model is built
    peak_rss        the process's peak resident memory over everything (build, patch, train)
    peak_rss_train  the peak during the training steps alone (high-water mark reset once the model is
                    ready): what a method changes
    peak_allocated  GPU only: torch.cuda.max_memory_allocated during the training steps

Adding a method (DoRA, S²FT, QAT ...): add a :class:`Method` to ``METHODS`` (in ``benchmarks.e2e_methods``) with one function per provider
that patches the base model in place (or wraps it) and returns the model to train; a method without a
PEFT counterpart simply lists fastft alone (or another peer). The suite picks it up as ``e2e-<name>``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# the methods live in e2e_methods; their names stay reachable from here
from .e2e_methods import (METHODS, Method, decoder_linears, quantize_decoder_linears, s2ft_config,  # noqa: F401
                          seeded_lora_adapters)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class E2ESetup:
    """Sizes of the random Llama, its synthetic language (``fastft.demo.data.grammar_batches``) and the run."""

    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 512
    words: int = 48  # the language uses token ids 1..words; 0 starts every sentence
    successors: int = 2  # each word can be followed by this many words
    init_std: float = 0.06
    seq_len: int = 128
    batch: int = 16
    steps: int = 40
    lr: float = 5e-3
    rank: int = 16
    alpha: float = 32
    seed: int = 0


def build_base_model(setup: E2ESetup):
    """A random ``LlamaForCausalLM`` of the setup's size (deterministic given ``setup.seed``)."""
    from fastft.demo.models import TinyLlamaShape, build_tiny_llama

    shape = TinyLlamaShape(hidden=setup.hidden, intermediate=setup.intermediate, layers=setup.layers,
                           heads=setup.heads, kv_heads=setup.kv_heads, vocab=setup.vocab, init_std=setup.init_std)
    return build_tiny_llama(shape, max_positions=setup.seq_len, seed=setup.seed)


def make_batches(setup: E2ESetup) -> list[torch.Tensor]:
    from fastft.demo.data import grammar_batches

    return grammar_batches(setup.words, setup.successors, setup.steps, setup.batch, setup.seq_len, setup.seed)


def setups():
    """The end-to-end model/run sizes: {"default": ..., "quick": ...} (:class:`E2ESetup`)."""
    default = E2ESetup(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=32000, seq_len=512,
                        batch=2, steps=6, lr=5e-3, rank=16, alpha=32, seed=0)
    # every in_features a multiple of 64, bitsandbytes' block: its CPU C++ dequantize_4bit (0.50.2) disagrees with
    # its own reference (and fastft) when the blocks straddle rows, e.g. for 256x688 weights
    # --quick: 4 steps (3 timed): a fresh process's imports and first step already cost most of its time
    quick = replace(default, hidden=256, intermediate=704, layers=2, heads=8, kv_heads=4, vocab=2048, seq_len=128,
                    steps=4)
    return {"default": default, "quick": quick}


# ----------------------------------------------------------------------------------------------- one variant
def run_variant(method_name: str, provider: str, setup, device: torch.device, dtype: torch.dtype) -> dict:
    """Build, patch and train one variant in this process; returns the figures (see the module docstring)."""
    from fastft.demo.variants import Trainer
    from fastft.dispatch import backend_for
    from fastft.process_memory import current_rss, peak_rss, release_freed_memory, reset_peak_rss
    from fastft.report import count_parameters

    from .harness import installed

    method = METHODS[method_name]
    for package in ("peft", *method.requires):  # the same imports for every variant of the method
        if installed(package):
            __import__(package)
    release_freed_memory()
    rss_baseline = current_rss()
    reset_peak_rss()

    model = build_base_model(setup).to(dtype)
    if method.prepare_base is not None:
        model = method.prepare_base(model, dtype, device)
    model = model.to(device)
    model = method.providers[provider](model, setup)
    trainable, total = count_parameters(model)
    fastft_backends = sorted({backend_for(m.op, device) for m in model.modules() if isinstance(getattr(m, "op", None), str)})
    batches = [ids.to(device) for ids in make_batches(setup)]

    peak_build = peak_rss()
    release_freed_memory()
    was_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model, setup.lr)
    losses, seconds = [], []
    for ids in batches:
        start = time.perf_counter()
        losses.append(trainer.step(ids))  # .item() synchronises a GPU
        seconds.append(time.perf_counter() - start)
    peak_train = peak_rss()
    result = dict(
        method=method_name, provider=provider, device=str(device), dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), backend="+".join(fastft_backends) or "-", losses=losses, step_seconds=seconds[1:] or seconds,
        rss_baseline=rss_baseline, peak_rss=max(peak_build, peak_train), peak_rss_train=peak_train,
        peak_rss_was_reset=was_reset, trainable_params=trainable, total_params=total,
    )
    if device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
    return result


def run_in_subprocess(method: str, provider: str, setup_name: str, device: torch.device, threads: int,
                      timeout_s: float) -> dict:
    """:func:`run_variant` in a fresh ``python -m benchmarks.e2e`` process; raises with its stderr on failure."""
    command = [sys.executable, "-m", "benchmarks.e2e", "--method", method, "--provider", provider,
               "--setup", setup_name, "--device", device.type, "--threads", str(threads)]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"the {method}/{provider} variant ran past {timeout_s:.0f} s and was stopped") from error
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"the {method}/{provider} variant exited with status {done.returncode}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----------------------------------------------------------------------------------------------- in the suite
def result_measurements(result: dict, shared_with: str | None = None) -> list:
    """The figures of one variant as suite measurements (``shared_with``: the case whose run they come from)."""
    from .harness import Measurement

    provider = result["provider"]
    role = "fastft" if provider == "fastft" else "peer"
    backend = result["backend"] if role == "fastft" or result["backend"] != "-" else "eager"
    times = sorted(result["step_seconds"])
    q = lambda p: times[min(len(times) - 1, round(p * (len(times) - 1)))]  # noqa: E731
    m = lambda metric, unit, value, **kw: Measurement(provider, backend, role, "train", metric, unit, value, **kw)  # noqa: E731
    note = f"{len(times)} steps after the first; each variant in its own process, one after the other (not interleaved)"
    if shared_with:
        note += f"; the same variant as {shared_with}, whose run these figures come from"
    out = [
        m("time", "s", statistics.median(times), p20=q(0.2), p80=q(0.8), note=note),
        m("final_loss", "nats", result["losses"][-1], note=f"after {len(result['losses'])} steps, same data and seed"),
        m("rss_baseline", "bytes", result["rss_baseline"], note="after imports, before the model"),
        m("peak_rss", "bytes", result["peak_rss"], note="whole process: build, patch, train"),
        m("peak_rss_train", "bytes", result["peak_rss_train"],
          note="training steps only" if result["peak_rss_was_reset"] else "peak could not be reset: whole process"),
        m("trainable_params", "params", result["trainable_params"]),
    ]
    if "peak_allocated" in result:
        out.append(m("peak_allocated", "bytes", result["peak_allocated"], note="torch.cuda.max_memory_allocated, training"))
    out += [m("loss", "nats", loss, x=("step", i + 1)) for i, loss in enumerate(result["losses"])]
    return out


def _step_flops(setup) -> float:
    """Rough FLOPs of one training step with a frozen base (forward + input gradients; for estimates only)."""
    head_dim = setup.hidden // setup.heads
    per_layer = setup.hidden * (setup.hidden + 2 * setup.kv_heads * head_dim) + setup.hidden ** 2 \
        + 3 * setup.hidden * setup.intermediate
    tokens = setup.batch * setup.seq_len
    linear = 4.0 * (setup.layers * per_layer + setup.hidden * setup.vocab) * tokens
    attention = 12.0 * tokens * setup.seq_len * setup.hidden * setup.layers
    return linear + attention


def suite_benchmarks() -> list:
    """One benchmark per method: ``e2e-<method>`` (tags "e2e" and the method), a case per provider."""
    from .harness import Benchmark, Case, installed, missing_note, Measurement

    def make_cases(method: Method):
        def cases(ctx) -> list:
            setup_name = "quick" if ctx.quick else "default"
            setup = setups()[setup_name]
            dtype = "bfloat16" if ctx.on_gpu else "float32"
            config = dict(setup=setup_name, hidden=setup.hidden, intermediate=setup.intermediate, layers=setup.layers,
                          seq=setup.seq_len, batch=setup.batch, vocab=setup.vocab, steps=setup.steps, rank=setup.rank,
                          dtype=dtype)
            slowdown = 2.0 if method.prepare_base is not None else 1.0
            startup_s = 15.0  # a fresh Python importing torch, transformers, peft (and bitsandbytes)

            def estimate(ctx) -> float:  # called after the suite calibrated the machine
                return startup_s * ctx.contention + setup.steps * _step_flops(setup) * slowdown / ctx.gemm_flops_per_s

            if ctx.quick and not method.quick:
                note = (f"e2e-{method.name} runs in the full sweep only: --quick keeps to e2e-qlora and e2e-dora, "
                        "which cover its parts, to stay under 3 minutes")
                run = lambda ctx, note=note: [Measurement("-", "-", "-", "-", "skipped", "", None, note=note)]
                return [Case(f"e2e-{method.name}", config, ("setup",), run, lambda ctx: 0.0,
                             name=f"e2e-{method.name} (full sweep only)")]
            # A variant that two methods share (e.g. fastft LoRA: e2e-lora's fastft, the LoRA peer of e2e-qat and
            # e2e-s2ft) runs once per suite run; the first case listing it runs it, the others reuse its figures.
            planned = ctx.__dict__.setdefault("e2e_planned", {})
            results = ctx.__dict__.setdefault("e2e_results", {})
            out = []
            for provider in method.providers:
                if provider == "peft" and not installed("peft"):
                    note = missing_note("peft", f"the PEFT variant of e2e-{method.name}")
                    run = lambda ctx, note=note: [Measurement("peft", "eager", "peer", "-", "skipped", "", None, note=note)]
                    out.append(Case(f"e2e-{method.name}", config, ("setup",), run, lambda ctx: 0.0,
                                    name=f"e2e-{method.name} peft (skipped)"))
                    continue
                key = (method.providers[provider], method.prepare_base)
                label = f"e2e-{method.name} {provider}"
                first = planned.setdefault(key, label)

                def run(ctx, provider=provider, key=key, first=first) -> list:
                    shared = key in results
                    if not shared:
                        timeout = max(600.0, 10 * estimate(ctx))
                        results[key] = run_in_subprocess(method.name, provider, setup_name, ctx.device,
                                                          torch.get_num_threads(), timeout)
                    return result_measurements(dict(results[key], provider=provider),
                                               shared_with=first if shared else None)

                where = "own process" if first == label else f"the {first} variant, run once"
                out.append(Case(f"e2e-{method.name}", config, ("setup",), run,
                                estimate if first == label else (lambda ctx: 0.0),
                                name=f"{label} ({setup_name} Llama, {where})", own_process=True))
            return out

        return cases

    return [
        Benchmark(f"e2e-{method.name}", make_cases(method), f"end to end: {method.description}",
                  tags=("e2e", method.name), requires=method.requires)
        for method in METHODS.values()
    ]


# ----------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="lora")
    parser.add_argument("--provider", default="fastft", help="fastft or a peer of the method (peft)")
    parser.add_argument("--setup", choices=("default", "quick"), default="default")
    parser.add_argument("--quick", action="store_true", help="same as --setup quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.provider not in METHODS[args.method].providers:
        parser.error(f"--provider for {args.method}: one of {sorted(METHODS[args.method].providers)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = setups()["quick" if args.quick else args.setup]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = run_variant(args.method, args.provider, setup, device, dtype)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
