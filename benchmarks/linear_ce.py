"""Loss + backward of a causal-LM head: fastft's fused linear cross-entropy vs transformers, a compiled chunked
loss, Apple's cut-cross-entropy and Liger-Kernel.

    python -m benchmarks.linear_ce --quick   # this module's benchmark ("linear_ce") through the suite

MEMORY: the default path holds the fp32 logits (tokens × vocab), their log-softmax and their gradient at
once: at tokens=8192 and vocab=152064 that is ~5 GB each, 15-20 GB in all. Before each point the memory
each path needs is estimated (:func:`memory_estimate`) and compared with what the machine has available:
a path that would not fit in 80% of it is skipped, with the reason.

Providers, on the same hidden states h (tokens × hidden, requires grad, as inside a network), lm_head weight W
(vocab × hidden, no bias, as in Llama) and labels (random ids, ~10% set to -100), lm_head frozen (LoRA
fine-tuning: only dh) or trainable (dW too):
  fastft        ``fastft.ops.linear_cross_entropy`` on the shifted labels, on every backend that runs here;
  transformers  ``logits = F.linear(h, W)`` then ``ForCausalLMLoss`` (the path of ``LlamaForCausalLM``);
  torch.compile a chunked loss in plain PyTorch (logits a chunk of tokens at a time), compiled (full sweep);
  cce           Apple's cut-cross-entropy: its Triton kernels on CUDA, its ``torch_compile`` implementation
                on a CPU (full sweep: it compiles);
  liger         Liger-Kernel's fused linear cross-entropy (Triton: CUDA only, "not run here" on a CPU).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F

from fastft import measure
from fastft.ops import linear_cross_entropy
from fastft.ops.linear_cross_entropy import default_chunk_size

CHUNK_TOKENS = 1024  # the compiled chunked loss's chunk


def chunked_loss(h: torch.Tensor, W: torch.Tensor, shifted: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy of ``h @ Wᵀ`` against ``shifted`` (-100 ignored), ``chunk`` tokens of logits at a time:
    what one writes in plain PyTorch to avoid the full logits (the torch.compile peer's code)."""
    h2, y = h.reshape(-1, h.shape[-1]), shifted.reshape(-1)
    total = h2.new_zeros((), dtype=torch.float32)
    for start in range(0, h2.shape[0], chunk):
        logits = F.linear(h2[start:start + chunk], W).float()
        total = total + F.cross_entropy(logits, y[start:start + chunk], ignore_index=-100, reduction="sum")
    return total / (y != -100).sum().clamp_min(1)


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
    from .harness import DTYPES, Skipped, Subject, compiled_peer, fastft_backends, forced_backend

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
    if too_big["fastft"]:  # the chunked peers hold what fastft holds, about
        return subjects
    # compiled losses are not timed backward-alone: a compiled backward donates its buffers and refuses the retained
    # graph that timing the backward alone needs (as fastft's fused loss, forward and step are timed)
    subjects.append(compiled_peer(ctx, chunked_loss, (h, W, shifted), None, grads, [W], what="a chunked loss",
                                  backward_alone=False))
    subjects.append(_cce(ctx, h, W, shifted, grads))
    subjects.append(_liger(ctx, h, W, shifted, grads))
    return subjects


def _cce(ctx, h, W, shifted, grads):
    """Apple's cut-cross-entropy: "cce" (Triton) on CUDA, its torch.compile implementation on a CPU."""
    from .harness import Skipped, Subject, installed, not_run_here

    if not installed("cut_cross_entropy"):
        return Skipped("cce", "-", "peer", "cut-cross-entropy is not installed: its peer skipped "
                       "(pip install cut-cross-entropy)")
    from cut_cross_entropy import linear_cross_entropy as cce_loss

    impl = "cce" if ctx.on_gpu else "torch_compile"
    if impl == "torch_compile" and not ctx.compile:
        return Skipped("cce", impl, "peer", "cut-cross-entropy's torch_compile implementation: not run in --quick "
                       "(it compiles); the full sweep runs it (or pass --compile)")
    if ctx.on_gpu and h.dtype == torch.float32:
        return not_run_here("cce", impl, "peer", "its kernels take bfloat16 / float16 inputs only")
    h2, y = h.reshape(-1, h.shape[-1]), shifted.reshape(-1)
    # its torch_compile implementation compiles with fullgraph=True, which refuses to run under the FLOP counter's
    # dispatch mode: the FLOPs are counted on the same function run eagerly (the same math)
    eager = (lambda: torch.compiler.set_stance("force_eager")) if impl == "torch_compile" else None
    return Subject("cce", impl, "peer", lambda: cce_loss(h2, W, y, impl=impl, ignore_index=-100), None, grads, [W],
                   flops_context=eager, backward_alone=impl != "torch_compile")


def _liger(ctx, h, W, shifted, grads):
    """Liger-Kernel's fused linear cross-entropy (Triton kernels: CUDA only)."""
    from .harness import Skipped, Subject, installed, not_run_here

    if not ctx.on_gpu:
        return not_run_here("liger", "triton", "peer", "Liger-Kernel's fused linear cross-entropy is Triton "
                            "kernels, which run on a GPU (on a CPU only under Triton's interpreter)")
    if not installed("liger_kernel"):
        return Skipped("liger", "triton", "peer", "liger-kernel is not installed: its peer skipped "
                       "(pip install liger-kernel)")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    h2, y = h.reshape(-1, h.shape[-1]), shifted.reshape(-1)
    return Subject("liger", "triton", "peer", lambda: loss(W, h2, y), None, grads, [W])


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
    from .harness import COMPILE_SECONDS, Benchmark, layer_case, layer_estimate, sweep_of, sweep_points

    sweeps = sweeps or SUITE_SWEEPS

    def step_flops(p: dict) -> float:
        return 2.0 * p["tokens"] * p["vocab"] * p["hidden"] * (3 if p["lm_head"] == "trainable" else 2)

    def cases(ctx) -> list:
        base, variables = sweep_of("linear_ce", sweeps, ctx)
        return [layer_case("linear_ce", point, x_names, build=suite_subjects, min_bytes=suite_min_bytes,
                           estimate_s=lambda ctx, point=point: layer_estimate(step_flops(point), 2 + 2 * ctx.compile, ctx)
                           + (2 * COMPILE_SECONDS if ctx.compile else 0.0))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("linear_ce", cases, "fused linear cross-entropy of an lm_head vs transformers' loss, "
                      "loss + backward", tags=("layer", "loss"))]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("linear_ce", suite_benchmarks()))
