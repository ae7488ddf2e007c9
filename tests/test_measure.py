"""fastft.measure: each helper counts exactly what its docstring says, on cases computed by hand.

No timing is asserted anywhere: only the shape of what ``time_interleaved`` returns.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # benchmarks/ is a top-level folder of the repository, not installed

from fastft import measure  # noqa: E402

import fastft  # noqa: E402

FLOAT32 = 4


# ----------------------------------------------------------------------------------- saved_bytes
def test_saved_bytes_counts_activations_once_and_excludes_parameters():
    torch.manual_seed(0)
    layer = nn.Linear(8, 16, bias=False)  # W: a trainable parameter
    x = torch.randn(4, 8, requires_grad=True)

    def forward():
        y = layer(x)  # saves x (for dW) and a view of W (for dx): W is excluded
        z = y.exp()  # saves its result: 4x16
        x.sin()  # saves x again: the same storage, counted once
        return z

    records = measure.saved_tensors(forward)
    reasons = sorted(r.reason for r in records)
    assert reasons == sorted(["counted", "view of a parameter", "counted", "storage already counted"])
    assert measure.saved_bytes(forward) == (4 * 8 + 4 * 16) * FLOAT32


def test_saved_bytes_excludes_detached_aliases_of_listed_parameters():
    weight = nn.Parameter(torch.randn(3, 8))
    x = torch.randn(3, 8, requires_grad=True)

    def forward():
        # mul saves the detached weight (for dx; it is no Parameter), exp saves its result
        return (x * weight.detach()).exp()

    assert measure.saved_bytes(forward) == 2 * 3 * 8 * FLOAT32
    assert measure.saved_bytes(forward, parameters=[weight]) == 3 * 8 * FLOAT32
    module = nn.Module()
    module.weight = weight
    assert measure.saved_bytes(forward, parameters=module) == 3 * 8 * FLOAT32


def test_saved_bytes_of_fastft_lora_is_x_plus_x_times_a_transposed():
    tokens, features, rank = 6, 12, 3
    holder = nn.Module()
    holder.proj = nn.Linear(features, features, bias=False)
    fastft.patch(holder, fastft.LoRAConfig(r=rank, targets=["proj"]))
    x = torch.randn(tokens, features, requires_grad=True)
    saved = measure.saved_bytes(lambda: holder.proj(x), parameters=holder)
    assert saved == (tokens * features + tokens * rank) * FLOAT32


def test_saved_bytes_is_zero_without_autograd():
    x = torch.randn(5, 5)
    assert measure.saved_bytes(lambda: x.exp().sin()) == 0


# ----------------------------------------------------------------------------------- peak_live_bytes
def test_peak_of_running_sum():
    assert measure.peak_of_running_sum([]) == 0
    assert measure.peak_of_running_sum([4, 8, -4, 2, -10]) == 12
    assert measure.peak_of_running_sum([-5, 3]) == 0


def test_peak_live_bytes_on_a_hand_computed_sequence():
    def allocate():
        a = torch.empty(1000)  # +4000
        b = torch.empty(2000)  # +8000  -> 12000 live
        del a  # -4000
        c = torch.empty(500, dtype=torch.float64)  # +4000 -> 12000 again
        d = torch.empty(100, dtype=torch.int16)  # +200   -> 12200: the peak
        del b, c, d

    assert measure.peak_live_bytes(allocate) == 12200


def test_peak_live_bytes_ignores_tensors_alive_before_fn_and_their_frees():
    holder = [torch.empty(5000)]  # allocated before fn: neither it nor its free is seen

    def free_then_allocate():
        holder.pop()
        kept = torch.empty(1000)  # +4000
        del kept

    assert measure.peak_live_bytes(free_then_allocate) == 1000 * FLOAT32


def test_peak_live_bytes_of_a_matmul_forward_and_backward():
    # y = x @ w (4x16) is live with dx (4x8) at the end of backward; the seed gradient is passed in.
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 16)
    seed = torch.randn(4, 16)

    def step():
        x.grad = None
        y = x @ w
        y.backward(seed)

    step()
    assert measure.peak_live_bytes(step) == (4 * 16 + 4 * 8) * FLOAT32


# ----------------------------------------------------------------------------------- time_interleaved
def test_time_interleaved_returns_well_formed_stats_in_round_robin_order():
    calls = []
    providers = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = measure.time_interleaved(providers, repeats=5, warmup=2)
    assert list(timings) == ["a", "b", "c"]
    assert len(calls) == 3 * (5 + 2)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for timing in timings.values():
        assert len(timing.samples_s) == 5
        assert all(s >= 0 and math.isfinite(s) for s in timing.samples_s)
        assert min(timing.samples_s) <= timing.p20_s <= timing.median_s <= timing.p80_s <= max(timing.samples_s)
        assert timing.threads == torch.get_num_threads()
        assert timing.device == "cpu" and timing.repeats == 5 and timing.warmup == 2
        assert "ms" in str(timing)


def test_time_interleaved_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure.time_interleaved({})
    with pytest.raises(ValueError):
        measure.time_interleaved({"a": lambda: None}, repeats=0)


# ----------------------------------------------------------------------------------- flops
def test_flops_of_matmuls_including_in_place_addmm():
    a, b, c = torch.randn(4, 8), torch.randn(8, 16), torch.zeros(4, 16)
    assert measure.flops(lambda: a @ b) == 2 * 4 * 8 * 16
    assert measure.flops(lambda: c.addmm_(a, b)) == 2 * 4 * 8 * 16
    assert measure.flops(lambda: (a.exp() + 1).sum()) == 0


def test_flops_of_grouped_mm_count_the_rows_its_offsets_cover():
    """torch._grouped_mm (the MoE experts' GEMM; FlopCounterMode alone counts it 0): forward 2·rows·K·N over the
    rows the offsets cover (the last 10 rows belong to no group), backward twice that (dx: 2-D × 3-D; dW: 2-D ×
    2-D split along the rows)."""
    rows, covered, K, N = 100, 90, 64, 32
    x = torch.randn(rows, K, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, K, N, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([10, 40, 70, covered], dtype=torch.int32)
    grad = torch.randn(rows, N, dtype=torch.bfloat16)
    assert measure.flops(lambda: torch._grouped_mm(x, w, offs=offs)) == 2 * covered * K * N
    step = measure.flops_by_op(lambda: torch._grouped_mm(x, w, offs=offs).backward(grad))
    assert step == {"aten._grouped_mm": 3 * 2 * covered * K * N}
    batched = torch.randn(4, 8, K, dtype=torch.bfloat16)
    assert measure.flops(lambda: torch._grouped_mm(batched, w)) == 2 * 4 * 8 * K * N


def test_flops_see_inside_fastft_custom_op():
    tokens, features_in, features_out, rank = 4, 8, 16, 2
    holder = nn.Module()
    holder.proj = nn.Linear(features_in, features_out, bias=False)
    fastft.patch(holder, fastft.LoRAConfig(r=rank, targets=["proj"]))
    x = torch.randn(tokens, features_in)
    counted = measure.flops_by_op(lambda: holder.proj(x))
    # x Wᵀ, x Aᵀ, then (x Aᵀ) Bᵀ added in place
    expected = 2 * tokens * (features_in * features_out + features_in * rank + rank * features_out)
    assert sum(counted.values()) == expected
    assert all(op.startswith("aten.") for op in counted)


def test_format_bytes():
    assert measure.format_bytes(512) == "512 B"
    assert measure.format_bytes(3 * 1024 * 1024) == "3.00 MiB"


def test_live_bytes_deltas_drop_frees_of_blocks_allocated_elsewhere():
    events = [(0, 0xA, 100), (1, 0xB, -400), (2, 0xC, 50), (3, 0xA, -100), (4, 0xC, -50)]
    assert measure.live_bytes_deltas(events) == [100, 50, -100, -50]


def test_peak_live_bytes_does_not_depend_on_earlier_profiling():
    # a tensor allocated while an earlier measurement was profiling, freed in a later one
    holder = []
    measure.peak_live_bytes(lambda: holder.append(torch.empty(3000)))

    def free_then_allocate():
        holder.pop()
        kept = torch.empty(1000)
        del kept

    assert measure.peak_live_bytes(free_then_allocate) == 1000 * FLOAT32


def test_saved_tensors_does_not_keep_the_graph_alive():
    """An op that saves its own output (exp) must not leak its graph through the measuring hooks."""
    import weakref

    x = torch.randn(64, 64, requires_grad=True)
    outputs = []

    def forward():
        y = (x * 2).exp()
        outputs.append(weakref.ref(y))
        return y.sum()

    assert measure.saved_bytes(forward) == 64 * 64 * 4  # exp's output (a product with a number saves nothing)
    assert outputs[0]() is None
