"""Loss + backward of a causal-LM head: transformers' default path vs fastft's fused linear cross-entropy.

    python -m benchmarks.linear_ce                          # tokens=8192, hidden=4096, vocab 32k/128k/152k
    python -m benchmarks.linear_ce --quick                  # small shapes, seconds
    python -m benchmarks.linear_ce --vocab 32000 --tokens 2048 --csv linear_ce.csv

MEMORY: the default path holds the fp32 logits (tokens × vocab), their log-softmax and their gradient at
once: at tokens=8192 and vocab=152064 that is ~5 GB each, 15-20 GB in all. Before each shape the memory
each path needs is estimated (:func:`memory_estimate`) and compared with what the machine has available:
a path that would not fit in 80% of it is skipped, with the reason printed (``--no-memory-check`` runs it
anyway). Choose the vocabularies with ``--vocab`` on a shared machine.

Providers, on the same hidden states h (tokens × hidden, requires grad, as inside a network), lm_head
weight W (vocab × hidden, no bias, as in Llama) and labels (random ids, ~10% set to -100):
  transformers  ``logits = F.linear(h, W)`` then ``transformers.loss.loss_utils.ForCausalLMLoss`` (the
                path of ``LlamaForCausalLM.forward``: ``.float()``, shift, cross_entropy), backward;
  fastft        ``fastft.ops.linear_cross_entropy`` on the shifted labels (the reference backend on CPU,
                the Triton kernel on CUDA), backward.
Each is run with lm_head frozen (LoRA fine-tuning: only dh is needed) and trainable (full fine-tuning:
dW too, a vocab × hidden tensor that both must produce). Before each step the gradients are dropped.

Measured, side by side in one process (see ``fastft.measure``):
  peak live  peak increase of live tensor bytes during loss + backward (h, W, labels allocated before);
             "peak - grads" subtracts the gradients the step must leave behind (h.grad, and W.grad when
             lm_head trains: V×H, which both paths hold at the end), leaving the loss's working memory;
  time       median and p20/p80 of interleaved runs;
  GFLOP      matmul FLOPs (FlopCounterMode; fastft's op counted through its reference).
Before measuring, the two are checked to give the same loss and gradients.

The issue's targets: fastft's peak memory at most 10% of transformers', its time at most 1.2x on CPU.
Reported per shape and setting as met / MISSED, never asserted.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastft.ops import linear_cross_entropy
from fastft.ops.linear_cross_entropy import default_chunk_size

from fastft import measure

from . import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_VOCABS = (32000, 128256, 152064)
QUICK = dict(tokens=4096, hidden=256, vocab=[8000], repeats=3, warmup=1)
TARGET_MEMORY_SHARE = 0.10
TARGET_TIME_RATIO = 1.2


@dataclass
class Result:
    vocab: int
    setting: str  # "frozen lm_head" / "trainable lm_head"
    provider: str
    timing: measure.Timing
    peak_live_bytes: int
    flops: int
    gradient_bytes: int  # h.grad (+ W.grad when trainable): what the step must leave behind

    @property
    def working_bytes(self) -> int:
        """Peak live bytes beyond the gradients the step returns: the loss's own working memory."""
        return self.peak_live_bytes - self.gradient_bytes


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=g).to(dtype).requires_grad_(True)
    W = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[torch.rand(1, tokens, generator=g) < 0.1] = -100
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    return h, W, labels, shifted


def make_steps(h, W, labels, shifted, kind: str, chunk_size: int | None,
               with_default: bool = True) -> dict[str, Callable[[], torch.Tensor]]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    vocab = W.shape[0]

    def transformers_loss() -> torch.Tensor:
        return ForCausalLMLoss(F.linear(h, W), labels, vocab)

    def fastft_loss() -> torch.Tensor:
        return linear_cross_entropy(h, W, shifted, kind=kind, chunk_size=chunk_size)

    def step(loss_fn):
        def run() -> None:
            h.grad = None
            W.grad = None
            loss_fn().backward()

        return run

    providers = {"fastft": fastft_loss}
    if kind == "ce" and with_default:
        providers = {"transformers": transformers_loss, **providers}
    return {name: step(fn) for name, fn in providers.items()}, providers


def check_agreement(h, W, providers) -> str:
    if "transformers" not in providers:
        return "fastft vs transformers: skipped (kind != 'ce' has no transformers counterpart)"
    results = {}
    for name, loss_fn in providers.items():
        h.grad = W.grad = None
        loss = loss_fn()
        loss.backward()
        results[name] = [loss.detach(), h.grad.clone(), None if W.grad is None else W.grad.clone()]
    h.grad = W.grad = None
    parts = []
    for label, a, b in zip(("loss", "dh", "dW"), results["fastft"], results["transformers"]):
        if a is not None:
            parts.append(f"{label} {(a.float() - b.float()).abs().max().item():.2e}")
    return "fastft vs transformers, max abs difference: " + ", ".join(parts)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


MEMORY_SHARE = 0.8  # of the available memory, at most, for one path's estimated peak


def memory_estimate(provider: str, tokens: int, hidden: int, vocab: int, itemsize: int, trainable: bool,
                    chunk_size: int | None = None) -> int:
    """Bytes one loss + backward of ``provider`` holds at its peak, roughly (inputs included).

    transformers: the logits in the inputs' dtype, their float32 copy (when not float32 already), the
    log-softmax and two float32 logits-sized gradients (4 float32 N×V buffers, plus one in the inputs'
    dtype when it is not float32). fastft: a chunk's float32 logits (two with a softcap) and the float32 dW
    accumulator. Both: h, W, dh and (trainable lm_head) dW.
    """
    inputs = tokens * hidden * itemsize * 2 + vocab * hidden * itemsize * (2 if trainable else 1) + 16 * tokens
    if provider == "transformers":
        logits = tokens * vocab * (4 * 4 + (itemsize if itemsize != 4 else 0))
        return inputs + logits
    chunk = chunk_size or default_chunk_size(tokens, hidden, vocab)
    return inputs + 2 * chunk * vocab * 4 + (vocab * hidden * 4 if trainable else 0)


def memory_check(provider: str, tokens: int, hidden: int, vocab: int, itemsize: int, trainable: bool,
                 chunk_size: int | None, device: torch.device) -> str | None:
    """Why ``provider`` must not run at this shape here (its estimate beyond MEMORY_SHARE of what is
    available), or None when it fits or the available memory is unknown."""
    from .harness import available_memory

    need = memory_estimate(provider, tokens, hidden, vocab, itemsize, trainable, chunk_size)
    free = available_memory(device)
    if free is None or need <= MEMORY_SHARE * free:
        return None
    return (f"{provider} at tokens={tokens}, hidden={hidden}, vocab={vocab} needs about "
            f"{measure.format_bytes(need)}; {measure.format_bytes(free)} is available on {device.type} "
            f"(it runs when its estimate fits in {MEMORY_SHARE:.0%} of that)")


def run_shape(tokens, hidden, vocab, dtype, kind, chunk_size, repeats, warmup, settings,
              memory_checked: bool = True) -> tuple[list[Result], list[str]]:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    results, notes = [], []
    fits = {}
    for setting in settings:
        for provider in ("transformers", "fastft"):
            why = memory_check(provider, tokens, hidden, vocab, itemsize, setting == "trainable lm_head", chunk_size,
                               torch.device("cpu")) if memory_checked else None
            fits[(setting, provider)] = why is None
            if why is not None:
                notes.append(f"[vocab {vocab}, {setting}] {provider} skipped: {why} (--no-memory-check runs it)")
                print(f"skipping {provider} at vocab {vocab}, {setting}: {why}", flush=True)
    if not any(fits.values()):
        return results, notes
    h, W, labels, shifted = make_inputs(tokens, hidden, vocab, dtype)
    for setting in settings:
        if not fits[(setting, "fastft")]:
            continue
        W.requires_grad_(setting == "trainable lm_head")
        steps, providers = make_steps(h, W, labels, shifted, kind, chunk_size,
                                      with_default=fits[(setting, "transformers")])
        notes.append(f"[vocab {vocab}, {setting}] " + check_agreement(h, W, providers))
        memory_and_flops = {}
        for name, step in steps.items():
            step()  # warm (allocator, first-call overheads)
            memory_and_flops[name] = (measure.peak_live_bytes(step), measure.flops(step))
        load_before = _load_average()
        timings = measure.time_interleaved(steps, repeats=repeats, warmup=warmup)
        load_after = _load_average()
        notes.append(f"[vocab {vocab}, {setting}] 1-min load average {_fmt(load_before)} before timing, "
                     f"{_fmt(load_after)} after")
        gradient_bytes = h.numel() * h.element_size() + (W.numel() * W.element_size() if W.requires_grad else 0)
        for name in steps:
            results.append(Result(vocab, setting, name, timings[name], *memory_and_flops[name], gradient_bytes))
    h.grad = W.grad = None
    return results, notes


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: list[Result], shape: str) -> str:
    header = ("vocab", "lm_head", "provider", "median ms", "p20 ms", "p80 ms", "x default", "peak live",
              "% of default", "peak - grads", "% of default", "GFLOP")
    rows, verdicts = [], []
    groups: dict[tuple[int, str], dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.vocab, r.setting), {})[r.provider] = r
    for (vocab, setting), group in groups.items():
        default = group.get("transformers")
        for r in group.values():
            t = r.timing
            rows.append((
                str(vocab), setting.split()[0], r.provider, f"{t.median_s * 1e3:.1f}", f"{t.p20_s * 1e3:.1f}",
                f"{t.p80_s * 1e3:.1f}", "-" if default is None else f"{t.median_s / default.timing.median_s:.3f}",
                measure.format_bytes(r.peak_live_bytes),
                "-" if default is None else f"{100.0 * r.peak_live_bytes / max(default.peak_live_bytes, 1):.1f}%",
                measure.format_bytes(r.working_bytes),
                "-" if default is None else f"{100.0 * r.working_bytes / max(default.working_bytes, 1):.1f}%",
                f"{r.flops / 1e9:.2f}",
            ))
        if default is not None:
            ours = group["fastft"]
            share = ours.peak_live_bytes / max(default.peak_live_bytes, 1)
            ratio = ours.timing.median_s / default.timing.median_s
            verdicts.append(
                f"vocab {vocab}, {setting}: peak memory <= {TARGET_MEMORY_SHARE:.0%} of default: "
                f"{'met' if share <= TARGET_MEMORY_SHARE else 'MISSED'} ({share:.1%}); time <= {TARGET_TIME_RATIO}x: "
                f"{'met' if ratio <= TARGET_TIME_RATIO else 'MISSED'} ({ratio:.3f}x); [info] working memory beyond "
                f"the returned gradients: {ours.working_bytes / max(default.working_bytes, 1):.1%} of default's"
            )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).rjust(w) if i > 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    first = results[0].timing
    out = [
        f"causal-LM loss + backward: {shape}",
        f"machine: CPU, {first.threads} threads, {os.cpu_count()} cores; {first.repeats} timed runs after "
        f"{first.warmup} warm-up, interleaved; torch {torch.__version__}",
        line(header),
        line(tuple("-" * w for w in widths)),
        *(line(row) for row in rows),
        "",
        *("target " + v for v in verdicts),
    ]
    return "\n".join(out)


def write_csv(path: str, results: list[Result], args: argparse.Namespace) -> None:
    fields = ["benchmark", "provider", "setting", "metric", "value", "unit", "tokens", "hidden", "vocab", "kind",
              "dtype", "threads", "device", "repeats", "warmup", "torch", "load_average"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in results:
            common = dict(benchmark="linear_ce", provider=r.provider, setting=r.setting, tokens=args.tokens,
                          hidden=args.hidden, vocab=r.vocab, kind=args.kind, dtype=args.dtype,
                          threads=r.timing.threads, device="cpu", repeats=args.repeats, warmup=args.warmup,
                          torch=torch.__version__, load_average=_fmt(_load_average()))
            for metric, value, unit in (("time_median", r.timing.median_s, "s"), ("time_p20", r.timing.p20_s, "s"),
                                        ("time_p80", r.timing.p80_s, "s"), ("peak_live", r.peak_live_bytes, "bytes"),
                                        ("peak_minus_gradients", r.working_bytes, "bytes"), ("flops", r.flops, "flop")):
                writer.writerow(dict(common, metric=metric, value=value, unit=unit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear_ce", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the batch (batch × sequence)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (lm_head's in features)")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(FULL_VOCABS),
                        help="vocabulary sizes to run (default: 32000 128256 152064; mind the memory warning)")
    parser.add_argument("--kind", choices=("ce", "dft", "talr"), default="ce",
                        help="fastft's loss kind (only 'ce' has a transformers counterpart to compare with)")
    parser.add_argument("--setting", choices=("frozen", "trainable", "both"), default="both",
                        help="lm_head frozen (LoRA), trainable (full fine-tuning) or both")
    parser.add_argument("--chunk-size", type=int, default=None, help="fastft's token chunk (default: automatic)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="run every path even when its estimated memory exceeds 80%% of what is available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return cli.parse_standalone_args(parser, argv, QUICK, repeats=3, warmup=1)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    settings = {"frozen": ["frozen lm_head"], "trainable": ["trainable lm_head"],
                "both": ["frozen lm_head", "trainable lm_head"]}[args.setting]
    results, notes = [], []
    for vocab in args.vocab:
        shape_results, shape_notes = run_shape(args.tokens, args.hidden, vocab, dtype, args.kind, args.chunk_size,
                                               args.repeats, args.warmup, settings,
                                               memory_checked=not args.no_memory_check)
        results += shape_results
        notes += shape_notes
    chunks = ", ".join(f"{v}: {args.chunk_size or default_chunk_size(args.tokens, args.hidden, v)}" for v in args.vocab)
    shape = (f"tokens={args.tokens}, hidden={args.hidden}, kind={args.kind}, {args.dtype}, no bias; "
             f"fastft token chunk per vocab {{{chunks}}}")
    print(format_table(results, shape) if results else f"causal-LM loss + backward: {shape}: nothing measured")
    print("\n".join(notes))
    if args.csv:
        write_csv(args.csv, results, args)
        print(f"wrote {len(results) * 6} rows to {args.csv}")
    return results


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs the loss + backward of an lm_head ("linear_ce"), lm_head frozen (LoRA
# fine-tuning: dh only) and trainable (dW too), across one-at-a-time sweeps. Providers: fastft on every
# backend that runs here, transformers' default path (the peer). A path whose estimated memory does not fit
# in 80% of what the device has available is skipped with the reason (:func:`memory_check`), so the full
# sweep's largest vocabularies run where they fit and are reported as skipped elsewhere.
SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(tokens=512, hidden=256, vocab=4000, lm_head="frozen", dtype="float32"),
                       dict(lm_head=["frozen", "trainable"])),
    ("cpu", "full"): (dict(tokens=1024, hidden=256, vocab=32000, lm_head="frozen", dtype="float32"),
                      dict(vocab=[32000, 128256, 152064], tokens=[1024, 4096], lm_head=["frozen", "trainable"],
                           dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(tokens=8192, hidden=4096, vocab=32000, lm_head="frozen", dtype="bfloat16"),
                        dict(vocab=[32000, 128256], lm_head=["frozen", "trainable"])),
    ("cuda", "full"): (dict(tokens=8192, hidden=4096, vocab=128256, lm_head="frozen", dtype="bfloat16"),
                       dict(vocab=[32000, 128256, 152064], tokens=[2048, 8192, 16384], lm_head=["frozen", "trainable"],
                            dtype=["bfloat16", "float32"])),
}


def _fastft_kept_bytes(loss: torch.Tensor) -> int:
    """The gradients the fused op computed in its forward and keeps on its graph node until backward."""
    grads = getattr(loss.grad_fn, "grads", None) or []
    return sum(g.numel() * g.element_size() for g in grads)


def suite_subjects(config: dict, ctx) -> list:
    """fastft (each backend) and transformers' default path at one point, on the same h, W and labels."""
    from .harness import DTYPES, Skipped, Subject, fastft_backends, forced_backend

    tokens, hidden, vocab = config["tokens"], config["hidden"], config["vocab"]
    dtype, device = DTYPES[config["dtype"]], ctx.device
    trainable = config["lm_head"] == "trainable"
    itemsize = torch.empty(0, dtype=dtype).element_size()
    too_big = {name: memory_check(name, tokens, hidden, vocab, itemsize, trainable, None, device)
               for name in ("fastft", "transformers")}
    backends, skipped = fastft_backends("linear_cross_entropy", device)
    if all(too_big.values()):  # nothing to run: build nothing
        return ([Skipped("fastft", b, "fastft", too_big["fastft"]) for b in backends] + skipped
                + [Skipped("transformers", "eager", "peer", too_big["transformers"])])
    h, W, labels, shifted = (t.to(device) for t in make_inputs(tokens, hidden, vocab, dtype))
    h = h.detach().requires_grad_(True)
    W = W.detach().requires_grad_(trainable)
    _, providers = make_steps(h, W, labels, shifted, "ce", None)
    grads = [h, W] if trainable else [h]

    subjects: list = []
    for backend in backends:
        if too_big["fastft"]:
            subjects.append(Skipped("fastft", backend, "fastft", too_big["fastft"]))
            continue
        subjects.append(Subject("fastft", backend, "fastft", providers["fastft"], None, grads, [W],
                                context=lambda backend=backend: forced_backend(backend),
                                flops_context=lambda: forced_backend("torch"), backward_alone=False,
                                kept_bytes=_fastft_kept_bytes))
    subjects += skipped
    if too_big["transformers"]:
        subjects.append(Skipped("transformers", "eager", "peer", too_big["transformers"]))
    else:
        subjects.append(Subject("transformers", "eager", "peer", providers["transformers"], None, grads, [W]))
    return subjects


def suite_min_bytes(config: dict, mode: str) -> int:
    """Bytes the loss must read and write at least: h, W and the labels in, dh (and dW) out; no logits."""
    from .harness import DTYPES

    n, k, v = config["tokens"], config["hidden"], config["vocab"]
    e = torch.empty(0, dtype=DTYPES[config["dtype"]]).element_size()
    grads = n * k * e + (v * k * e if config["lm_head"] == "trainable" else 0)
    forward = n * k * e + v * k * e + 8 * n + grads  # the fused op computes the gradients in its forward
    backward = 2 * grads  # scaled in place by the upstream gradient
    return {"forward": forward, "backward": backward, "step": forward + backward}[mode]


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """The fused-loss benchmark of ``python -m benchmarks`` ("linear_ce"); sweeps replaceable (tests)."""
    from .harness import Benchmark, layer_case, layer_estimate, sweep_points

    sweeps = sweeps or SUITE_SWEEPS

    def step_flops(p: dict) -> float:
        return 2.0 * p["tokens"] * p["vocab"] * p["hidden"] * (3 if p["lm_head"] == "trainable" else 2)

    def cases(ctx) -> list:
        key = (ctx.device.type, ctx.sweep)
        if key not in sweeps:
            raise ValueError(f"linear_ce: no sweep for {key}; known: {sorted(sweeps)}")
        base, variables = sweeps[key]
        return [layer_case("linear_ce", point, x_names, build=suite_subjects, min_bytes=suite_min_bytes,
                           estimate_s=lambda ctx, point=point: layer_estimate(step_flops(point), 2, ctx))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("linear_ce", cases, "fused linear cross-entropy of an lm_head vs transformers' loss, "
                      "loss + backward", tags=("layer", "loss"))]


if __name__ == "__main__":
    main(sys.argv[1:])
