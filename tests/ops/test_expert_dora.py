"""The expert DoRA op and norm against a float64 autograd evaluation of the explicit formula (B·A formed per expert,
the norm of the full matrix); the grouped-GEMM path (torch._grouped_mm) against the per-segment loop; the path
choice with a faked device capability; the router's adapted-weight op."""
from __future__ import annotations

import pytest
import torch

from fastft.ops import grouped_gemm
from fastft.ops.expert_dora import expert_dora, expert_row_norm
from fastft.ops.expert_lora import expert_lora
from fastft.ops.lora_weight import lora_weight

E, K, O, R = 4, 6, 5, 2
COUNTS = [3, 0, 6, 2]
OFFSETS = torch.tensor([0, 3, 3, 9, 11])


def _case(transposed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn((E, K, O) if transposed else (E, O, K), generator=gen, dtype=torch.float64)
    x = torch.randn(12, K, generator=gen, dtype=torch.float64)  # row 11 belongs to no expert
    A = torch.randn(E, R, K, generator=gen, dtype=torch.float64)
    B = torch.randn(E, O, R, generator=gen, dtype=torch.float64) * 0.5
    m = torch.rand(E, O, generator=gen, dtype=torch.float64) + 0.5
    return W, x, A, B, m


def _explicit(W, x, A, B, m, s, transposed, detach):
    """y of DoRA per expert from the formula, W_e + s·B_e A_e formed in full."""
    Wo = W.transpose(1, 2) if transposed else W  # E×O×K
    full = Wo + s * torch.bmm(B, A)
    norm = torch.linalg.vector_norm(full, dim=2)
    norm = norm.detach() if detach else norm
    Wp = full * (m / norm).unsqueeze(2)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(COUNTS))
    y = torch.einsum("sk,sok->so", x[:len(ids)], Wp[ids])
    return torch.cat([y, y.new_zeros(x.shape[0] - len(ids), O)])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("detach", [True, False])
def test_expert_dora_against_float64_formula(transposed, detach):
    W, x, A, B, m = _case(transposed)
    s = 0.7
    sq = (W.transpose(1, 2) if transposed else W).square().sum(2)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, m)]
    xl, Al, Bl, ml = leaves
    norm = expert_row_norm(W, transposed, Al.detach() if detach else Al, Bl.detach() if detach else Bl, sq, s)
    y = expert_dora(xl, OFFSETS, W, Al, Bl, ml / norm, s, transposed=transposed)
    grad = torch.randn_like(y)
    y.backward(grad)
    refs = [t.clone().requires_grad_(True) for t in (x, A, B, m)]
    ref = _explicit(W, *refs, s, transposed, detach)
    ref.backward(grad)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-11)


def test_row_norm_chunks_and_saved_tensors():
    W, x, A, B, m = _case(False)
    sq = W.square().sum(2)
    full = torch.linalg.vector_norm(W + 0.3 * torch.bmm(B, A), dim=2)
    torch.testing.assert_close(expert_row_norm(W, False, A, B, sq, 0.3, experts_per_chunk=3), full)
    W32, x32, A32, B32, g32 = W.float(), x.float().requires_grad_(True), A.float(), B.float(), m.float()
    A32.requires_grad_(True)
    g32.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = expert_dora(x32, OFFSETS, W32, A32, B32, g32, 0.3)
    assert all(t.untyped_storage().data_ptr() != y.untyped_storage().data_ptr() for t in saved)
    assert not any(t.numel() == E * O * K and t.data_ptr() != W32.data_ptr() for t in saved)  # no W + s·BA


@pytest.mark.parametrize("op", ["lora", "dora"])
def test_grouped_path_equals_loop(op, monkeypatch):
    gen = torch.Generator().manual_seed(1)  # fp32 rows of 8, 12 and 4 floats: 16-byte aligned, as the path needs
    W, x, A, B = (torch.randn(shape, generator=gen) for shape in ((E, 12, 8), (12, 8), (E, 4, 8), (E, 12, 4)))
    m = torch.rand(E, 12, generator=gen) + 0.5
    assert grouped_gemm.segment_path("cpu", torch.float32, (8, 12, 4)) == "loop"
    results = []
    for path in ("loop", "grouped"):
        monkeypatch.setenv("FASTFT_GROUPED_MM", path)
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, m)]
        if op == "lora":
            y = expert_lora(leaves[0], OFFSETS, W, leaves[1], leaves[2], 0.5)
        else:
            y = expert_dora(leaves[0], OFFSETS, W, leaves[1], leaves[2], leaves[3], 0.5)
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [t.grad for t in leaves if t.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert results[1][0][11].abs().max() == 0  # the row of no expert
    assert results[1][2][1].abs().max() == 0  # dA of the expert with no rows


def test_path_choice_with_faked_capability(monkeypatch):
    monkeypatch.delenv("FASTFT_GROUPED_MM", raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(grouped_gemm, "device_capability", lambda device: (9, 0) if device.type == "cuda" else None)
    assert grouped_gemm.segment_path(cuda, torch.bfloat16, (64, 128, 16)) == "grouped"
    assert grouped_gemm.segment_path(cuda, torch.bfloat16, (64, 128, 4)) == "loop"  # r=4: rows not 16-byte aligned
    assert grouped_gemm.segment_path(cuda, torch.float32, (64, 128, 16)) == "loop"
    assert grouped_gemm.segment_path("cpu", torch.bfloat16, (64, 128, 16)) == "loop"
    assert "grouped GEMM" in grouped_gemm.describe_path(cuda, torch.bfloat16, (64, 128, 16))
    monkeypatch.setattr(grouped_gemm, "device_capability", lambda device: (8, 0))
    assert grouped_gemm.segment_path(cuda, torch.bfloat16, (64, 128, 16)) == "loop"
    monkeypatch.setenv("FASTFT_GROUPED_MM", "grouped")
    assert grouped_gemm.segment_path("cpu", torch.float32) == "grouped"
    assert grouped_gemm.segment_path("cpu", torch.float32, (6,)) == "loop"  # 24-byte rows
    monkeypatch.setenv("FASTFT_GROUPED_MM", "fast")
    with pytest.raises(ValueError, match="FASTFT_GROUPED_MM"):
        grouped_gemm.segment_path("cpu", torch.float32)


def test_lora_weight_against_float64_autograd():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    A = torch.randn(2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    out = lora_weight(W, A, B, 0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    ref = W + 0.3 * B @ A
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], A.grad)
    torch.testing.assert_close(got[1], B.grad)
