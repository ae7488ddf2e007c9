"""Roofline model: bytes moved, FLOPs and PREDICTED time of fastft's launch plan and of the PEFT/transformers
path, per op, at LLM shapes (issue 14, item 5). Nothing here is measured.

``python -m benchmarks.roofline`` prints the table; ``--write`` also writes ``docs/roofline.md`` (or the path
given) with the launch plans behind each row.

The model. A plan is the list of kernels one forward + backward of a layer launches. Each kernel moves
``bytes`` (every operand read once, every result written once: ideal caching inside a kernel, none between
kernels) and does ``flops`` (matrix products only, 2·m·n·k; elementwise work costs bytes, not time at these
intensities). Its predicted time is ``max(flops / peak, bytes / bandwidth)``; a plan's time is the sum over its
kernels (no launch overhead, no overlap). Peaks (DESIGN.md): H100 SXM bf16 989 TFLOP/s dense, 3.35 TB/s;
A100 SXM bf16 312 TFLOP/s, 2.0 TB/s. Activations and weights are bf16 (2 bytes), accumulators float32.

fastft's plan is the issue's target design on CUDA: the frozen base GEMM (forward and dx) of LoRA / DoRA /
QLoRA / S²FT by cuBLAS, the low-rank term folded into its output by an in-place ``addmm_`` (a GEMM with
beta = 1: it reads and rewrites the output), skinny low-rank products, masks, norms and scales in Triton; the
fused loss chunks over tokens — logits by cuBLAS, one Triton pass for softmax, loss and logit gradient in place,
then dh (and dW, accumulated in float32) by cuBLAS; QLoRA dequantizes the 4-bit weight once per call into a
reused buffer. The peer paths are what PEFT 0.21 / transformers 5 run: PEFT LoRA = base linear, dropout,
lora_A, lora_B, scaling and add as separate kernels (autograd mirrors them); PEFT DoRA builds the full out×in
weight ``B·A`` (through ``lora_B(lora_A(eye))``) and its norm every forward; transformers' causal-LM loss
materializes the logits, upcasts them to float32 and runs cross-entropy on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

E = 2  # bytes of a bf16 activation / weight element
ACC = 4  # bytes of a float32 accumulator element
MASK = 1  # bytes of a boolean dropout-mask element


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    flops: float  # dense bf16 tensor-core peak, FLOP/s
    bandwidth: float  # HBM, bytes/s

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute bound."""
        return self.flops / self.bandwidth


GPUS = {
    "H100": GPU("H100 SXM", 989e12, 3.35e12),
    "A100": GPU("A100 SXM", 312e12, 2.0e12),
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    tokens: int = 8192
    hidden: int = 4096  # in = out features of the adapted linear layers
    rank: int = 16
    vocab: int = 128256
    s2ft_width: int = 512  # trained slice of S²FT (four 128-wide heads)
    dropout: bool = True  # LoRA/QLoRA with dropout p > 0 (PEFT: an nn.Dropout kernel); DoRA without
    nf4_blocksize: int = 64
    absmax_blocksize: int = 256  # nested (double) quantization of the absmax, as QLoRA recipes use


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float

    def seconds(self, gpu: GPU) -> float:
        return max(self.flops / gpu.flops, self.bytes / gpu.bandwidth)


def gemm(name: str, m: int, n: int, k: int, a_bytes: int = E, b_bytes: int = E, out_bytes: int = E,
         accumulate: bool = False) -> Kernel:
    """C (m×n) = A (m×k) · B (k×n); ``accumulate``: C += ... (beta = 1: C is read as well as written)."""
    return Kernel(name, 2.0 * m * n * k, m * k * a_bytes + k * n * b_bytes + m * n * out_bytes * (2 if accumulate else 1))


def pointwise(name: str, read: float, write: float) -> Kernel:
    """An elementwise / reduction pass reading ``read`` bytes and writing ``write`` bytes."""
    return Kernel(name, 0.0, read + write)


Plan = dict  # {"forward": [Kernel], "backward": [Kernel]}


# ------------------------------------------------------------------------------------------------- LoRA
def lora_fastft(s: Shapes, base: Optional[list] = None) -> Plan:
    M, K, N, R = s.tokens, s.hidden, s.hidden, s.rank
    mask = M * K * MASK if s.dropout else 0
    fwd = list(base or [])
    if s.dropout:
        fwd.append(pointwise("dropout mask (bernoulli_)", 0, mask))
    fwd += [
        Kernel("xa = (x⊙m) Aᵀ  [Triton, mask and 1/(1-p) in the load]", 2.0 * M * K * R, M * K * E + mask + R * K * E + M * R * E),
        gemm("y = x Wᵀ  [cuBLAS]", M, N, K),
        gemm("y += s·xa Bᵀ  [cuBLAS addmm_, beta=1]", M, N, R, accumulate=True),
    ]
    bwd = list(base or [])
    bwd += [
        gemm("gb = g B  [Triton skinny]", M, R, N),
        gemm("dx = g W  [cuBLAS]", M, K, N),
    ]
    if s.dropout:
        bwd.append(Kernel("dx += s·(gb A) ⊙ m/(1-p)  [Triton, in place]", 2.0 * M * K * R,
                          M * R * E + R * K * E + mask + 2 * M * K * E))
    else:
        bwd.append(gemm("dx += s·gb A  [cuBLAS addmm_, beta=1]", M, K, R, accumulate=True))
    bwd += [
        Kernel("dA = s·gbᵀ (x⊙m)  [Triton, split-K]", 2.0 * M * K * R, M * R * E + M * K * E + mask + R * K * ACC),
        gemm("dB = s·gᵀ xa  [Triton, split-K]", N, R, M, out_bytes=ACC),
    ]
    return dict(forward=fwd, backward=bwd)


def lora_peft(s: Shapes, base_fwd: Optional[list] = None, base_bwd: Optional[list] = None) -> Plan:
    M, K, N, R = s.tokens, s.hidden, s.hidden, s.rank
    fwd = list(base_fwd or []) + [gemm("result = base_layer(x)  [cuBLAS]", M, N, K)]
    if s.dropout:
        fwd.append(pointwise("x̃ = dropout(x)  (writes x̃ and its mask)", M * K * E, M * K * E + M * K * MASK))
    fwd += [
        gemm("xa = lora_A(x̃)", M, R, K),
        gemm("t = lora_B(xa)", M, N, R),
        pointwise("t = t * scaling", M * N * E, M * N * E),
        pointwise("result = result + t", 2 * M * N * E, M * N * E),
    ]
    bwd = list(base_bwd or []) + [
        pointwise("grad_t = g * scaling", M * N * E, M * N * E),
        gemm("d_xa = grad_t B  (lora_B backward)", M, R, N),
        gemm("dB = grad_tᵀ xa", N, R, M),
        gemm("d_x̃ = d_xa A  (lora_A backward)", M, K, R),
        gemm("dA = d_xaᵀ x̃", R, K, M),
    ]
    if s.dropout:
        bwd.append(pointwise("d_x_lora = d_x̃ ⊙ m/(1-p)  (dropout backward)", M * K * E + M * K * MASK, M * K * E))
    bwd += [
        gemm("dx_base = g W  (base_layer backward)", M, K, N),
        pointwise("dx = dx_base + d_x_lora  (autograd accumulation)", 2 * M * K * E, M * K * E),
    ]
    return dict(forward=fwd, backward=bwd)


# ------------------------------------------------------------------------------------------------ QLoRA
def _dequantize(s: Shapes, who: str) -> list:
    """The NF4 weight (nested absmax) to a bf16 N×K buffer: bitsandbytes' kernel, or fastft's into a reused buffer."""
    N, K = s.hidden, s.hidden
    blocks = N * K // s.nf4_blocksize
    return [
        pointwise(f"absmax = dequantize(absmax codes)  [{who}]", blocks * 1 + blocks // s.absmax_blocksize * ACC + 256 * ACC,
                  blocks * ACC),
        pointwise(f"W = dequantize_nf4(packed)  [{who}]", N * K // 2 + blocks * ACC, N * K * E),
    ]


def qlora_fastft(s: Shapes) -> Plan:
    return lora_fastft(s, base=_dequantize(s, "fastft, once per call, reused buffer"))


def qlora_peft(s: Shapes) -> Plan:
    # bitsandbytes' MatMul4Bit dequantizes W in forward and again in backward, then a dense GEMM
    return lora_peft(s, base_fwd=_dequantize(s, "bitsandbytes"), base_bwd=_dequantize(s, "bitsandbytes"))


# ------------------------------------------------------------------------------------------------- DoRA
def dora_fastft(s: Shapes) -> Plan:
    M, K, N, R = s.tokens, s.hidden, s.hidden, s.rank
    # dx = (g ⊙ gy) W: scale whichever operand is smaller (W's rows: N×K; gy's columns: M×N), then cuBLAS
    scaled = min(M * N, N * K)
    fwd = [
        gemm("P = W Aᵀ  [Triton skinny, split-K]", N, R, K, out_bytes=ACC),
        gemm("G = A Aᵀ", R, R, K, out_bytes=ACC),
        pointwise("n = ‖W_i + s·B_i A‖ from ‖W_i‖², P, B, G  [Triton]", N * ACC + N * R * (ACC + E) + R * R * ACC, N * ACC),
        gemm("xa = x Aᵀ  [Triton skinny]", M, R, K),
        gemm("z = x Wᵀ  [cuBLAS]", M, N, K),
        gemm("z += s·xa Bᵀ  [cuBLAS addmm_, beta=1]", M, N, R, accumulate=True),
        pointwise("y = (m/n) ⊙ z + b, in place  [Triton]", M * N * E + 2 * N * ACC, M * N * E),
    ]
    bwd = [
        pointwise("dm = Σ_tokens gy ⊙ (y - b)/g  [Triton, split over tokens]", 2 * M * N * E + N * ACC, N * ACC),
        gemm("gb = gy (diag(g) B)  [Triton skinny]", M, R, N),
        pointwise("diag(g) W (or gy diag(g), the smaller)  [Triton]", scaled * E + N * ACC, scaled * E),
        gemm("dx = (g ⊙ gy) W  [cuBLAS]", M, K, N),
        gemm("dx += s·gb A  [cuBLAS addmm_, beta=1]", M, K, R, accumulate=True),
        gemm("dA = s·gbᵀ x  [Triton, split-K]", R, K, M, out_bytes=ACC),
        gemm("dB = s·diag(g) gyᵀ xa  [Triton, split-K]", N, R, M, out_bytes=ACC),
    ]
    return dict(forward=fwd, backward=bwd)


def dora_peft(s: Shapes) -> Plan:
    M, K, N, R = s.tokens, s.hidden, s.hidden, s.rank
    MN = M * N * E
    fwd = [
        gemm("result = base_layer(x)  [cuBLAS]", M, N, K),
        pointwise("x_eye = torch.eye(in)", 0, K * K * E),
        gemm("lora_A(x_eye)", K, R, K),
        gemm("lora_weight = lora_B(lora_A(x_eye)).T  (out×in)", K, N, R),
        pointwise("scaling * lora_weight", N * K * E, N * K * E),
        pointwise("weight + scaling * lora_weight", 2 * N * K * E, N * K * E),
        pointwise("weight_norm = linalg.norm(·, dim=1)", N * K * E, N * E),
        gemm("xa = lora_A(x)", M, R, K),
        gemm("lora_result = lora_B(xa)", M, N, R),
        pointwise("(mag_norm_scale - 1) * base_result", MN, MN),
        pointwise("mag_norm_scale * lora_result", MN, MN),
        pointwise("· * scaling", MN, MN),
        pointwise("result_dora = · + ·", 2 * MN, MN),
        pointwise("result = result + result_dora", 2 * MN, MN),
    ]
    bwd = [
        pointwise("d_base_a = g * (mag_norm_scale - 1)", MN, MN),
        pointwise("g * base_result  (magnitude grad, first term)", 2 * MN, MN),
        pointwise("Σ_tokens", MN, N * ACC),
        pointwise("d_c = g * scaling", MN, MN),
        pointwise("d_c * lora_result  (magnitude grad, second term)", 2 * MN, MN),
        pointwise("Σ_tokens", MN, N * ACC),
        pointwise("d_lora_result = d_c * mag_norm_scale", MN, MN),
        gemm("d_xa = d_lora_result B  (lora_B backward)", M, R, N),
        gemm("dB = d_lora_resultᵀ xa", N, R, M),
        gemm("d_x_lora = d_xa A  (lora_A backward)", M, K, R),
        gemm("dA = d_xaᵀ x", R, K, M),
        pointwise("d_base = g + d_base_a  (autograd accumulation)", 2 * MN, MN),
        gemm("dx_base = d_base W  (base_layer backward)", M, K, N),
        pointwise("dx = dx_base + d_x_lora  (autograd accumulation)", 2 * M * K * E, M * K * E),
    ]
    return dict(forward=fwd, backward=bwd)


# ------------------------------------------------------------------------------------------------- S²FT
def s2ft_fastft(s: Shapes) -> Plan:
    M, K, N, S = s.tokens, s.hidden, s.hidden, s.s2ft_width
    fwd = [gemm("y = x Wᵀ  [cuBLAS]", M, N, K), pointwise("save x[:, :S]  (copy of the slice only)", M * S * E, M * S * E)]
    bwd = [gemm("dx = g W  [cuBLAS]", M, K, N), gemm("dW_s = gᵀ x[:, :S]  [cuBLAS, N×S]", N, S, M)]
    return dict(forward=fwd, backward=bwd)


def s2ft_peer(s: Shapes) -> Plan:
    """Full-weight gradient masked to the slice (requires_grad on W and a gradient hook): the usual way
    without a dedicated op."""
    M, K, N = s.tokens, s.hidden, s.hidden
    fwd = [gemm("y = x Wᵀ  [cuBLAS]  (x saved whole)", M, N, K)]
    bwd = [gemm("dx = g W", M, K, N), gemm("dW = gᵀ x  (full N×K)", N, K, M),
           pointwise("dW ⊙ slice mask  (gradient hook)", N * K * E + N * K * MASK, N * K * E)]
    return dict(forward=fwd, backward=bwd)


# ------------------------------------------------------------------------------------- linear cross-entropy
def ce_chunk(s: Shapes) -> int:
    """Tokens per chunk of the fused loss: the smallest power of two (at least 256) at which the per-chunk
    float32 dW update (read and rewrite V×H float32 in a beta = 1 GEMM) is compute bound on every GPU of
    ``GPUS``: 2·C·H·V / peak ≥ 2·V·H·4 / bandwidth, i.e. C ≥ 4·peak/bandwidth."""
    need = max(ACC * g.ridge for g in GPUS.values())
    return min(s.tokens, max(256, 1 << math.ceil(math.log2(need))))


def ce_fastft(s: Shapes, train_head: bool, chunk: Optional[int] = None) -> Plan:
    T, H, V = s.tokens, s.hidden, s.vocab
    C = chunk or ce_chunk(s)
    chunks = math.ceil(T / C)
    fwd, bwd = [], []  # the loss and its gradients come out of one pass (forward); backward scales them
    for _ in range(chunks):
        fwd.append(gemm(f"logits_c = h_c Wᵀ  [cuBLAS, {C} tokens]", C, V, H))
        fwd.append(pointwise("softmax, loss, logit gradient in place  [Triton]", C * V * E + C * (8 + ACC), C * V * E + 2 * C * ACC))
        fwd.append(gemm("dh_c = g_c W  [cuBLAS]", C, H, V))
        if train_head:
            fwd.append(gemm("dW += g_cᵀ h_c  [cuBLAS addmm_, float32 accumulator]", V, H, C, out_bytes=ACC, accumulate=True))
    if train_head:
        fwd.append(pointwise("dW to bf16", V * H * ACC, V * H * E))
    bwd.append(pointwise("dh *= grad_loss (and dW)", T * H * E * 2 + (V * H * E * 2 if train_head else 0), 0))
    return dict(forward=fwd, backward=bwd)


def ce_transformers(s: Shapes, train_head: bool) -> Plan:
    T, H, V = s.tokens, s.hidden, s.vocab
    TV = T * V
    fwd = [
        gemm("logits = lm_head(h)  [cuBLAS, bf16]", T, V, H),
        pointwise("logits.float()", TV * E, TV * ACC),
        pointwise("log_softmax (float32)", TV * ACC, TV * ACC),
        pointwise("nll_loss", T * ACC + T * 8, ACC),
    ]
    bwd = [
        pointwise("nll_loss backward (float32 T×V)", T * 8, TV * ACC),
        pointwise("log_softmax backward", 2 * TV * ACC, TV * ACC),
        pointwise(".float() backward", TV * ACC, TV * E),
        gemm("dh = dlogits W", T, H, V),
    ]
    if train_head:
        bwd.append(gemm("dW = dlogitsᵀ h", V, H, T))
    return dict(forward=fwd, backward=bwd)


# ----------------------------------------------------------------------------------------------- the table
OPS: list[tuple[str, Callable[[Shapes], Plan], Callable[[Shapes], Plan], str]] = [
    ("LoRA linear", lora_fastft, lora_peft, "PEFT LoRA"),
    ("QLoRA linear (NF4)", qlora_fastft, qlora_peft, "PEFT + bitsandbytes"),
    ("DoRA linear", dora_fastft, dora_peft, "PEFT DoRA"),
    ("S²FT linear", s2ft_fastft, s2ft_peer, "full dW, masked"),
    ("linear cross-entropy, frozen lm_head", lambda s: ce_fastft(s, False), lambda s: ce_transformers(s, False),
     "transformers loss"),
    ("linear cross-entropy, trained lm_head", lambda s: ce_fastft(s, True), lambda s: ce_transformers(s, True),
     "transformers loss"),
]


def plan_totals(plan: Plan, gpus=GPUS) -> dict:
    kernels = plan["forward"] + plan["backward"]
    return dict(bytes=sum(k.bytes for k in kernels), flops=sum(k.flops for k in kernels), launches=len(kernels),
                seconds={name: sum(k.seconds(g) for k in kernels) for name, g in gpus.items()})


def rows(s: Shapes = Shapes()) -> list[dict]:
    out = []
    for op, fast, peer, peer_name in OPS:
        f, p = plan_totals(fast(s)), plan_totals(peer(s))
        out.append(dict(op=op, peer=peer_name, fastft=f, peer_totals=p))
    return out


def _shapes_line(s: Shapes) -> str:
    return (f"tokens {s.tokens}, hidden (in = out) {s.hidden}, rank {s.rank}, vocabulary {s.vocab}, S²FT slice "
            f"{s.s2ft_width}, LoRA dropout {'on' if s.dropout else 'off'}, bf16; fused-loss chunk {ce_chunk(s)} tokens")


def table(s: Shapes = Shapes()) -> str:
    head = ("| op (forward + backward) | peer | fastft GB | peer GB | fastft GFLOP | peer GFLOP "
            "| H100 fastft ms | H100 peer ms | A100 fastft ms | A100 peer ms | predicted speed-up H100 / A100 |")
    lines = [f"Predicted, not measured: roofline at {_shapes_line(s)}.", "", head, "|" + "---|" * 11]
    for r in rows(s):
        f, p = r["fastft"], r["peer_totals"]
        lines.append(
            f"| {r['op']} | {r['peer']} | {f['bytes'] / 1e9:.2f} | {p['bytes'] / 1e9:.2f} | {f['flops'] / 1e9:.0f} "
            f"| {p['flops'] / 1e9:.0f} | {f['seconds']['H100'] * 1e3:.2f} | {p['seconds']['H100'] * 1e3:.2f} "
            f"| {f['seconds']['A100'] * 1e3:.2f} | {p['seconds']['A100'] * 1e3:.2f} "
            f"| {p['seconds']['H100'] / f['seconds']['H100']:.2f}x / {p['seconds']['A100'] / f['seconds']['A100']:.2f}x |")
    return "\n".join(lines) + "\n"


def _plan_markdown(title: str, plan: Plan) -> list[str]:
    lines = [f"**{title}**", "", "| pass | kernel | GFLOP | MB | H100 µs (predicted) | A100 µs (predicted) |",
             "|---|---|---|---|---|---|"]
    merged: list = []
    for direction in ("forward", "backward"):
        for k in plan[direction]:  # repeated kernels (the loss's chunks) are shown once with a count
            if merged and merged[-1][0] == direction and merged[-1][1].name == k.name:
                merged[-1][2] += 1
            else:
                merged.append([direction, k, 1])
    for direction, k, count in merged:
        times = [k.seconds(g) * count * 1e6 for g in GPUS.values()]
        lines.append(f"| {direction} | {k.name}{f' ×{count}' if count > 1 else ''} | {k.flops * count / 1e9:.1f} "
                     f"| {k.bytes * count / 1e6:.1f} | {times[0]:.0f} | {times[1]:.0f} |")
    return lines + [""]


def document(s: Shapes = Shapes()) -> str:
    lines = [
        "# Roofline: fastft's launch plan against the PEFT / transformers path", "",
        "**Predicted, not measured.** Generated by `python -m benchmarks.roofline --write`; the model and its "
        "assumptions are in the docstring of `benchmarks/roofline.py`. Each kernel's time is "
        "max(FLOPs / peak, bytes / bandwidth) with H100 SXM 989 TFLOP/s bf16 dense and 3.35 TB/s, A100 SXM "
        "312 TFLOP/s and 2.0 TB/s; a plan's time is the sum over its kernels (no launch overhead, no overlap). "
        "Bytes count each operand read once and each result written once per kernel. FLOPs count matrix products.",
        "", "fastft's plan is the target design of issue 14 (cuBLAS for the frozen base GEMMs and the logits, "
        "low-rank terms folded in with in-place `addmm_`, Triton for skinny products, masks, norms, scales and the "
        "softmax gradient); the kernels fastft ships today fuse more into Triton GEMMs.", "",
        table(s), "",
        f"The fused loss's chunk ({ce_chunk(s)} tokens) is the smallest power of two at which the per-chunk float32 "
        "dW update (a V×H read and rewrite) stays compute bound: C ≥ 4·peak/bandwidth, 1181 tokens on an H100 and "
        f"624 on an A100. At 512 tokens (fastft's `default_chunk_size` for 8192 tokens) a trained lm_head predicts "
        f"{plan_totals(ce_fastft(s, True, 512))['seconds']['H100'] * 1e3:.1f} ms on an H100 against "
        f"{plan_totals(ce_fastft(s, True))['seconds']['H100'] * 1e3:.1f} ms at {ce_chunk(s)} and "
        f"{plan_totals(ce_transformers(s, True))['seconds']['H100'] * 1e3:.1f} ms for transformers: the dW update "
        "is then memory bound.", "", "## Launch plans", "",
    ]
    for op, fast, peer, peer_name in OPS:
        lines.append(f"### {op}")
        lines.append("")
        lines += _plan_markdown("fastft", fast(s))
        lines += _plan_markdown(peer_name, peer(s))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", nargs="?", const="docs/roofline.md", default=None, metavar="PATH",
                        help="also write the page with the launch plans (default docs/roofline.md)")
    parser.add_argument("--tokens", type=int, default=Shapes.tokens)
    parser.add_argument("--hidden", type=int, default=Shapes.hidden)
    parser.add_argument("--rank", type=int, default=Shapes.rank)
    parser.add_argument("--vocab", type=int, default=Shapes.vocab)
    args = parser.parse_args(argv)
    s = Shapes(tokens=args.tokens, hidden=args.hidden, rank=args.rank, vocab=args.vocab)
    print(table(s), end="")
    if args.write:
        Path(args.write).write_text(document(s))
        print(f"\nwrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
