"""Backward-FLOP formulas of the LoRA variants against FlopCounterMode on a real step, for every subset of
trained tensors: lora_linear with its scale_vector (LoLDU's diagonal, Selective LoRA's gate) and lofit_linear."""
import pytest
import torch
from helpers import backend
from test_policy_costs import Holder, assert_formula_matches_counter, call_proj
from torch import nn

import fastft
from fastft.nn import LoFiTLinear, LoLDULinear


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_with_scale_vector(bias):
    torch.manual_seed(0)
    holder = Holder(nn.Linear(24, 20, bias=bias), torch.randn(2, 7, 24))
    fastft.patch(holder, fastft.LoRAConfig(r=3, targets=["proj"], init="loldu"))
    assert isinstance(holder.proj, LoLDULinear)
    with backend("torch"):
        assert_formula_matches_counter(holder, call_proj, ["x", "proj.lora_A", "proj.lora_B", "proj.lora_diag"])


@pytest.mark.parametrize("bias", [False, True])
def test_lofit_linear(bias):
    torch.manual_seed(0)
    holder = Holder(LoFiTLinear(nn.Linear(24, 20, bias=bias).requires_grad_(False), heads=(1, 3), head_dim=6),
                    torch.randn(2, 7, 24))
    assert_formula_matches_counter(holder, call_proj, ["x", "proj.lofit_offset"])
