"""``fastft.ops.quant_linear``: a composite op registered with the dispatch (its math is tested against
written-out formulas in tests/plans/test_qat_model.py and its FLOP formula in tests/policies)."""
import importlib

import pytest
import torch

from fastft import dispatch
from fastft.nn.quant import QuantSpec

quant_linear = importlib.import_module("fastft.ops.quant_linear")


def test_registered_as_a_composite_that_runs_its_reference_under_any_backend():
    assert dispatch.op_backends("quant_linear") == ("torch",)
    for forced in ("torch", "triton", "cpp", "cuda"):
        with dispatch.use_backend(forced):
            assert dispatch.backend_for("quant_linear", "cpu") == "torch"
            assert (dispatch.implementation("quant_linear", "forward", torch.device("cpu"))
                    is quant_linear.quant_linear_forward_reference)


def test_a_composite_registers_torch_only():
    with pytest.raises(ValueError, match="composite"):
        dispatch.register_op("composite_test_only", {"torch": {}, "triton": {}}, composite=True)
    assert "composite_test_only" not in dispatch._OP_BACKENDS


@pytest.mark.parametrize("clipped", [False, True])
def test_the_function_runs_the_registered_entries(clipped):
    torch.manual_seed(0)
    spec = QuantSpec(4, "channel", 32, False, 0.9, "clipped" if clipped else "identity")
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    B = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, dtype=torch.float64)
    y = quant_linear.quant_weight_linear(x, w, b, spec, clipped, A, B, 0.5)
    y.backward(g)
    assert torch.equal(y.detach(), quant_linear.quant_linear_forward_reference(x, w, b, A, B, 0.5, spec))
    expected = quant_linear.quant_linear_backward_reference(
        g, x.detach(), w.detach(), A.detach(), B.detach(), 0.5, spec, clipped, b.dtype, True, True, True, True, True)
    for got, want in zip((x.grad, w.grad, b.grad, A.grad, B.grad), expected):
        assert torch.equal(got, want)
