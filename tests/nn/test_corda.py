"""CorDA (``LoRAConfig(init="corda")``): the math against its definition, PEFT's CorDA on a tiny Llama (same
init -> same factors, same residual, same logits), save/load, export through PEFT, training, bad values."""
import copy

import pytest
import torch
from helpers import assert_adapter_round_trips, assert_close, tiny_model, training_losses

import fastft
from fastft.math.lora_inits import corda_factors, corda_sample_covariance
from fastft.nn import LoRALinear

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def calib_ids(n=3, length=10, seed=0):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_factors_reconstruct_the_chosen_components(mode):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    X = torch.randn(40, 9, generator=g, dtype=torch.float64)
    C = corda_sample_covariance(X).double()
    A, B = corda_factors(W, C, 3, mode, scale=2.0)
    # W C = U Σ Vᵀ (damped C), so W = U Σ Vᵀ C⁻¹: the r chosen triplets, times s, give s·BA
    fixed = C + torch.eye(9, dtype=torch.float64) * C.diagonal().mean() * 0.01
    U, S, Vh = torch.linalg.svd(W.float() @ fixed.float(), full_matrices=False)
    pick = slice(None, 3) if mode == "ipm" else slice(-3, None)
    want = (U[:, pick] * S[pick]) @ (Vh[pick] @ torch.linalg.inv(fixed.float()))
    torch.testing.assert_close((2.0 * B @ A).float(), want, atol=1e-4, rtol=1e-4)
    # all components together give W back
    Aall, Ball = corda_factors(W, C, 9, mode, scale=1.0)
    torch.testing.assert_close((Ball @ Aall).double(), W, atol=1e-4, rtol=1e-4)


def peft_corda(base, ids, mode, r=4, alpha=8):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = copy.deepcopy(base)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))

    def run_model():  # PEFT's hook takes one sample per forward (it squeezes the batch dimension)
        for row in ids:
            model(input_ids=row[None])

    preprocess_corda(model, config, run_model=run_model)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_matches_peft_corda(mode):
    base = tiny_model("llama", torch.float32)
    ids = calib_ids()
    twin = peft_corda(base, ids, mode)
    ours = copy.deepcopy(base)
    # one sample per forward, as PEFT's hook needs: the same activations bit for bit (a batched forward differs
    # in the last bits, which the kpm components, the smallest singular values, amplify)
    calib = [row[None] for row in ids]
    fastft.patch(ours, fastft.LoRAConfig(r=4, alpha=8, init="corda", corda_mode=mode, calib=calib, targets=TARGETS))
    theirs = {n: m for n, m in twin.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert len(theirs) == len(lora_modules(ours)) == 6
    for name, module in lora_modules(ours).items():
        other = theirs["base_model.model." + name]
        # the SVD's sign choice is the same code path (torch.linalg.svd of the same float32 matrix)
        torch.testing.assert_close(module.lora_A, other.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(module.lora_B, other.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(module.base_layer.weight, other.base_layer.weight, atol=2e-5, rtol=1e-4)
    test = calib_ids(2, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(test).logits, twin(test).logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours(test).logits, base(test).logits, atol=2e-5, rtol=1e-4)  # unchanged at init


def test_save_load_export_and_unpatch(tmp_path):
    base = tiny_model("llama", torch.float64)
    ids = calib_ids()
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.LoRAConfig(r=4, init="corda", corda_mode="ipm", calib=[ids[:2], ids[2:]],
                                          targets=["q_proj", "gate_proj"]))
    with torch.no_grad():
        for module in lora_modules(model).values():  # "train" a little
            module.lora_A.add_(0.05 * torch.randn_like(module.lora_A))
            module.lora_B.add_(0.05 * torch.randn_like(module.lora_B))
    test = calib_ids(2, 9, seed=4)
    assert_adapter_round_trips(model, base, test, tmp_path)  # loads with no calib: the saved factors give the residual
    with torch.no_grad():
        fastft.unpatch(model, merge=False)
        assert_close(model(test).logits, base(test).logits)


def test_tiny_llama_trains():
    model = tiny_model("llama")
    ids = calib_ids(4, 12)
    fastft.patch(model, fastft.LoRAConfig(r=4, init="corda", calib=ids))
    losses = training_losses(model, ids, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="corda"), "needs calib"),
    (dict(init="corda", calib=3), "calib"),
    (dict(init="corda", calib=torch.zeros(1, 2, dtype=torch.long), corda_mode="big"), "corda_mode"),
    (dict(corda_mode="ipm"), "init='corda' only"),
    (dict(calib=torch.zeros(1, 2, dtype=torch.long)), "init='corda' only"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.LoRAConfig(**kwargs)


def test_calibration_must_reach_every_target():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="never reached"):
        fastft.patch(model, fastft.LoRAConfig(r=4, init="corda", calib=lambda m: None))
    assert not fastft.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
