"""The registry of backward-FLOP formulas (fastft/node_costs.py): each op registers its formula beside it."""
import importlib

from fastft import dispatch, node_costs
from fastft.policies import cost

# the op modules (fastft.ops re-exports functions of the same names)
dora, dora_row_norm, fake_quantize, hadamard, linear_cross_entropy, lora, quant_linear, s2ft_linear = (
    importlib.import_module(f"fastft.ops.{name}")
    for name in ("dora", "dora_row_norm", "fake_quantize", "hadamard", "linear_cross_entropy", "lora", "quant_linear",
                 "s2ft_linear")
)


def test_each_op_registers_its_formula_from_its_own_file():
    expected = {
        "lora_linear": lora.lora_linear_backward_flops,
        "dora_linear": dora.dora_linear_backward_flops,
        "dora_row_norm": dora_row_norm.dora_row_norm_backward_flops,
        "hadamard_transform": hadamard.hadamard_transform_backward_flops,
        "fake_quantize": fake_quantize.fake_quantize_backward_flops,
        "linear_cross_entropy": linear_cross_entropy.linear_cross_entropy_backward_flops,
        "s2ft_linear": s2ft_linear.s2ft_linear_backward_flops,
    }
    for op, formula in expected.items():
        assert node_costs.NODE_COSTS[node_costs.custom_op_node(op)] is formula, op
    assert node_costs.NODE_COSTS["_LoRALinearEagerBackward"] is lora.lora_linear_backward_flops
    assert node_costs.NODE_COSTS["_QuantWeightLinearBackward"] is quant_linear.quant_linear_backward_flops
    assert cost.NODE_COSTS is node_costs.NODE_COSTS  # the walker reads the same registry


def test_grad_shape_nodes_follow_the_decorator():
    assert node_costs.GRAD_SHAPE_NODES >= {
        "BmmBackward0", "BaddbmmBackward0", node_costs.custom_op_node("hadamard_transform"),
        node_costs.custom_op_node("fake_quantize"), node_costs.custom_op_node("s2ft_linear"),
    }
    assert node_costs.custom_op_node("lora_linear") not in node_costs.GRAD_SHAPE_NODES
    assert "MmBackward0" not in node_costs.GRAD_SHAPE_NODES


def test_register_op_takes_node_costs():
    @node_costs.reads_grad_shape
    def formula(node, grad_shape):
        return [(2, (0,))]

    name = "GeneratedBackwardFor_fastft_test_only_op_defaultBackward"
    try:
        dispatch.register_op("test_only_op", {"torch": {"forward": lambda x: x}}, node_costs={name: formula})
        assert node_costs.NODE_COSTS[name] is formula and name in node_costs.GRAD_SHAPE_NODES
        assert node_costs.custom_op_node("test_only_op") == name
    finally:
        node_costs.NODE_COSTS.pop(name, None)
        node_costs.GRAD_SHAPE_NODES.discard(name)
        for table in (dispatch._OP_BACKENDS, dispatch._OP_LIMITS, dispatch._OP_IMPLEMENTATIONS):
            table.pop("test_only_op", None)
        dispatch._PURE_OPS.discard("test_only_op")
