"""PiSSA's factor computation (``fastft.math.lora_inits.pissa_factors``), the pure function ``LoRALinear`` uses."""
from __future__ import annotations

import torch
from helpers import assert_close
from torch import nn

from fastft import LoRAConfig
from fastft.math.lora_inits import pissa_factors
from fastft.nn import LoRALinear


def test_factors_are_the_best_rank_r_piece_scaled():
    torch.manual_seed(0)
    weight = torch.randn(12, 20, dtype=torch.float64)
    r, scale = 3, 2.0
    A, B = pissa_factors(weight, r, scale)
    assert A.shape == (r, 20) and B.shape == (12, r) and A.dtype == weight.dtype
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]  # Eckart–Young: the best rank-r approximation
    assert_close(scale * B @ A, best, torch.float64)
    # A and B carry the same singular values (sqrt of Σ/s each)
    assert_close(A.norm(dim=1), B.norm(dim=0), torch.float64)


def test_the_module_initialises_with_them_and_keeps_the_residual():
    torch.manual_seed(1)
    linear = nn.Linear(16, 10)
    original = linear.weight.detach().clone()
    layer = LoRALinear(linear, LoRAConfig(r=4, alpha=8, init="pissa"))
    A, B = pissa_factors(original, 4, layer.scale)
    assert_close(layer.lora_A.detach(), A, torch.float32)
    assert_close(layer.lora_B.detach(), B, torch.float32)
    assert_close(layer.base_layer.weight.detach() + layer.scale * B @ A, original, torch.float32)
