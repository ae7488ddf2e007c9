"""The sparse-delta op against a float64 autograd evaluation of the dense formula.

The formula is ``y = x (W + ΔW)ᵀ + b`` with a dense ΔW requiring grad; the op must give the same y and
dx, and for its k values exactly the dense ΔW gradient at the k positions (the SDDMM) — both paths (the
sparse terms and the dense add), 2-D and 3-D inputs, with and without bias, k = 0.
"""
import pytest
import torch
from helpers import assert_close, backend

from fastft.ops import sampled_gradient, sparse_delta_linear, sparse_support
from fastft.ops.sparse_delta_linear import SparseSupport, sparse_delta_linear_backward_flops, use_dense_delta

N, K, O = 13, 24, 19


def make(dtype, k=37, bias=True, lead=(N,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    W = torch.randn(O, K, generator=g, dtype=torch.float64) / K**0.5
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    idx = torch.randperm(O * K, generator=g)[:k].sort().values
    v = torch.randn(k, generator=g, dtype=torch.float64)
    grad = torch.randn(*lead, O, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(W), cast(b), idx, cast(v), cast(grad)


def dense_formula(x, W, b, idx, v, grad):
    """(y, dx, dΔW) of y = x (W + ΔW)ᵀ + b with a dense ΔW, in float64 autograd."""
    x = x.double().clone().requires_grad_(True)
    delta = torch.zeros(O * K, dtype=torch.float64)
    delta[idx] = v.double()
    delta = delta.view(O, K).requires_grad_(True)
    y = torch.nn.functional.linear(x, W.double() + delta, None if b is None else b.double())
    y.backward(grad.double())
    return y.detach(), x.grad, delta.grad


def run(x, W, b, idx, v, grad, dense=None):
    x = x.clone().requires_grad_(True)
    v = v.clone().requires_grad_(True)
    y = sparse_delta_linear(x, W, b, idx, v, dense=dense)
    y.backward(grad)
    return y.detach(), x.grad, v.grad


# the reference's two sparse paths: at most min(O, K) slots gathers columns, more slots go through a CSR product
PATHS = pytest.mark.parametrize("k", [min(O, K) - 4, 37], ids=["gather", "csr"])


@PATHS
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("lead", [(N,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_dense_formula(dense, lead, bias, dtype, k):
    x, W, b, idx, v, grad = make(dtype, k=k, bias=bias, lead=lead)
    with backend("torch"):
        y, dx, dv = run(x, W, b, idx, v, grad, dense=dense)
    want_y, want_dx, want_dW = dense_formula(x, W, b, idx, v, grad)
    assert y.shape == (*lead, O) and dx.shape == x.shape and dv.shape == v.shape
    assert_close(y, want_y, dtype, msg="y")
    assert_close(dx, want_dx, dtype, msg="dx")
    assert_close(dv, want_dW.reshape(-1)[idx], dtype, msg="dv")


@pytest.mark.parametrize("k", [min(O, K) - 4, 60], ids=["gather", "csr"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype, k):
    x, W, b, idx, v, grad = make(dtype, k=k)
    with backend("torch"):
        y, dx, dv = run(x, W, b, idx, v, grad)
    want_y, want_dx, want_dW = dense_formula(x, W, b, idx, v, grad)
    assert_close(y, want_y, dtype, msg="y")
    assert_close(dx, want_dx, dtype, msg="dx")
    assert_close(dv, want_dW.reshape(-1)[idx], dtype, msg="dv")


def test_half_precision_never_takes_the_dense_path():
    """W + ΔW in bfloat16 would round a delta far below W's ulp away; the sparse term keeps it."""
    assert not use_dense_delta(10**6, 10**6, 4, 4, torch.bfloat16)
    assert use_dense_delta(10**6, 10**6, 4, 4, torch.float32)
    assert not use_dense_delta(1, 1, 4096, 4096, torch.float32)
    assert use_dense_delta(4096, 4096, 4096, 4096, torch.float32, "cpu")  # N·k = O·K
    assert not use_dense_delta(4096, 4096, 4096, 4096, torch.float32, "cuda")
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.bfloat16)
    W = torch.full((3, 4), 64.0, dtype=torch.bfloat16)  # ulp(64) = 0.5 in bfloat16: 64 + 0.125 rounds to 64
    idx, v = torch.tensor([0]), torch.tensor([0.125], dtype=torch.bfloat16)
    with backend("torch"):
        y = sparse_delta_linear(x, W, None, idx, v)
        rounded = sparse_delta_linear(x, W, None, idx, v, dense=True)
    assert y[0].tolist() == [0.125, 0.0, 0.0]  # x·W cancels; the delta's 0.125 survives
    assert rounded[0].tolist() == [0.0, 0.0, 0.0]  # what a bfloat16 W + ΔW would give


def test_k_zero_is_the_frozen_linear():
    x, W, b, _, _, grad = make(torch.float64)
    idx = torch.zeros(0, dtype=torch.int64)
    v = torch.zeros(0, dtype=torch.float64)
    with backend("torch"):
        y, dx, dv = run(x, W, b, idx, v, grad)
    assert_close(y, torch.nn.functional.linear(x, W, b))
    assert_close(dx, grad @ W)
    assert dv.shape == (0,)


def test_saves_only_x_besides_the_index_structures():
    x, W, b, idx, v, _ = make(torch.float32)
    x = x.clone().requires_grad_(True)
    v = v.clone().requires_grad_(True)
    saved = []
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_delta_linear(x, W, b, idx, v)
    float_saved = [t for t in saved if t.is_floating_point() and t.data_ptr() not in (W.data_ptr(), v.data_ptr())]
    assert [t.data_ptr() for t in float_saved] == [x.data_ptr()]  # x itself, no copy; nothing O×K
    assert all(t.numel() <= max(idx.numel(), O, K) + 1 for t in saved if not t.is_floating_point())


def test_without_value_gradient_x_is_not_saved():
    x, W, b, idx, v, grad = make(torch.float64)
    x = x.clone().requires_grad_(True)
    saved = []
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = sparse_delta_linear(x, W, b, idx, v)
    assert x.data_ptr() not in [t.data_ptr() for t in saved]
    y.backward(grad)
    assert_close(x.grad, dense_formula(x.detach(), W, b, idx, v, grad)[1])


def test_sampled_gradient_is_the_dense_gradient_at_the_positions():
    x, W, b, idx, v, grad = make(torch.float64, lead=(2, 7))
    _, _, want = dense_formula(x, W, b, idx, v, grad)
    unsorted = idx.flip(0)  # any order: the SDDMM needs no CSR
    with backend("torch"):
        got = sampled_gradient(grad, x, unsorted)
        from_support = sampled_gradient(grad, x, sparse_support(idx, (O, K)))
    assert_close(got, want.reshape(-1)[unsorted])
    assert_close(from_support, want.reshape(-1)[idx])


def test_support_structures():
    idx = torch.tensor([1, 5, 7, 24, 30, 47, 48 * 2 - 1])  # O=4 rows of K=24
    s = sparse_support(idx, (4, 24))
    assert s.rows.tolist() == [0, 0, 0, 1, 1, 1, 3]
    assert s.cols.tolist() == [1, 5, 7, 0, 6, 23, 23]
    assert s.row_ptr.tolist() == [0, 3, 6, 6, 7]
    assert s.cols[s.col_order].tolist() == sorted(s.cols.tolist())
    assert s.col_order.tolist() == [3, 0, 1, 4, 2, 5, 6]  # stable: ties keep CSR order
    assert s.col_ptr[-1].item() == 7 and s.col_ptr[24].item() == 7 and s.col_ptr[1].item() == 1


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([3, 3, 5]), "duplicates"),
    (torch.tensor([5, 3]), "sorted ascending"),
    (torch.tensor([O * K]), r"must lie in \[0, 456\)"),
    (torch.tensor([-1, 2]), "must lie in"),
    (torch.tensor([1.0, 2.0]), "int64"),
    (torch.tensor([[1, 2]]), "1-D int64"),
])
def test_bad_indices_are_rejected(bad, match):
    x, W, b, _, _, _ = make(torch.float32)
    with pytest.raises(ValueError, match=match):
        sparse_delta_linear(x, W, b, bad, torch.zeros(bad.numel()))


def test_bad_shapes_are_rejected():
    x, W, b, idx, v, _ = make(torch.float32)
    with pytest.raises(ValueError, match="values must have shape"):
        sparse_delta_linear(x, W, b, idx, v[:-1])
    with pytest.raises(ValueError, match="last dimension"):
        sparse_delta_linear(x[:, :-1], W, b, idx, v)
    with pytest.raises(ValueError, match="support is for"):
        sparse_delta_linear(x, W, b, None, v, support=sparse_support(idx, (O + 1, K)))
    with pytest.raises(RuntimeError, match="frozen"):
        sparse_delta_linear(x, W.clone().requires_grad_(True), b, idx, v.requires_grad_(True))


def test_flop_formula_counts_the_sddmm_not_a_dense_gradient():
    x, W, b, idx, v, _ = make(torch.float32)
    x.requires_grad_(True)
    v.requires_grad_(True)
    y = sparse_delta_linear(x, W, b, idx, v, dense=False)
    node = y.grad_fn
    items = sparse_delta_linear_backward_flops(node)
    k = idx.numel()
    assert items == [(2 * N * O * K + 2 * N * k, (0,)), (2 * N * k, (len(node.next_functions) - 7,))]
    assert isinstance(sparse_support(idx, (O, K)), SparseSupport)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_flop_formula_against_the_flop_counter(dense):
    """FlopCounterMode counts the matrix products only (dx's g W); the formula adds the sparse terms' 2·N·k
    multiply-adds (the gather of T(g) and the SDDMM), which the counter sees as elementwise work (0)."""
    from fastft import measure

    x, W, b, idx, v, grad = make(torch.float32)
    x.requires_grad_(True)
    v.requires_grad_(True)
    k = idx.numel()

    def step():
        sparse_delta_linear(x, W, b, idx, v, dense=dense).backward(grad)

    with backend("torch"):
        with torch.no_grad():
            forward = measure.flops(lambda: sparse_delta_linear(x, W, b, idx, v, dense=dense))
        counted = measure.flops(step) - forward
        y = sparse_delta_linear(x, W, b, idx, v, dense=dense)
    items = sparse_delta_linear_backward_flops(y.grad_fn)
    sparse_terms = (0 if dense else 2 * N * k) + 2 * N * k
    assert sum(f for f, _ in items) - sparse_terms == counted == 2 * N * O * K


@pytest.mark.parametrize("bias", [False, True])
def test_cost_model_reads_the_formula_on_the_right_edges(bias):
    """fastft.policies.cost on a SparseDeltaLinear: training x alone costs dx, the values alone the SDDMM."""
    from torch import nn

    from fastft.nn import SparseDeltaLinear
    from fastft.policies.cost import build_cost_model

    class Holder(nn.Module):
        def __init__(self, layer, x):
            super().__init__()
            self.proj, self.x = layer, nn.Parameter(x)

    k = 30
    idx = torch.randperm(O * K, generator=torch.Generator().manual_seed(0))[:k].sort().values
    layer = SparseDeltaLinear(nn.Linear(K, O, bias=bias).requires_grad_(False), idx, torch.randn(k))
    layer.dense_path = False
    holder = Holder(layer, torch.randn(2, 7, K))
    holder.requires_grad_(False)
    candidates = [("x", holder.x.requires_grad_(True)), ("proj.delta_values", layer.delta_values.requires_grad_(True))]
    cost = build_cost_model(holder, candidates, lambda m: m.proj(m.x), [], "", ())
    tokens = 14
    assert cost.flops(0b01) == 2 * tokens * O * K + 2 * tokens * k
    assert cost.flops(0b10) == 2 * tokens * k
    assert cost.flops(0b11) == 2 * tokens * O * K + 4 * tokens * k


@PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_token_and_slot_blocks_do_not_change_the_result(monkeypatch, dtype, k):
    """The reference works in blocks of tokens and of slots to bound its transients; tiny blocks, same answer."""
    import sys

    op = sys.modules["fastft.ops.sparse_delta_linear"]  # the package exports a function of the same name
    x, W, b, idx, v, grad = make(dtype, k=k, lead=(3, 5))
    with backend("torch"):
        whole = run(x, W, b, idx, v, grad, dense=False)
        monkeypatch.setattr(op, "_TOKEN_BLOCK", 2 * O)  # 1 or 2 tokens a block
        monkeypatch.setattr(op, "_CHUNK", 7)  # a few slots a block
        blocked = run(x, W, b, idx, v, grad, dense=False)
    for got, want in zip(blocked, whole):
        assert_close(got, want, dtype)


def test_the_formula_is_registered_with_the_op():
    from fastft import node_costs

    name = node_costs.custom_op_node("sparse_delta_linear")
    assert node_costs.NODE_COSTS[name] is sparse_delta_linear_backward_flops
    assert name not in node_costs.GRAD_SHAPE_NODES  # it reads the node's meta only
