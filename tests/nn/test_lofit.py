"""LoFiT (``LoFiTConfig``): head selection leaves the model as it was, the layer adds the offsets to the
selected query heads' slices (GQA: query heads), save/load, merge into o_proj's bias, unpatch, training."""
import copy

import pytest
import torch
from helpers import assert_close, tiny_model, training_losses

import fastft
from fastft.nn import LoFiTLinear


def ids(seed=0, n=2, length=10):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def batch(seed=0):
    x = ids(seed)
    return {"input_ids": x, "labels": x}


def lofit_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoFiTLinear)}


def test_layer_adds_offsets_to_the_selected_head_slices():
    layer = torch.nn.Linear(4 * 6, 9, dtype=torch.float64)
    module = LoFiTLinear(layer, heads=(3, 0), head_dim=6)
    with torch.no_grad():
        module.lofit_offset.copy_(torch.randn(2, 6, dtype=torch.float64))
    x = torch.randn(5, 24, dtype=torch.float64)
    shifted = x.clone()
    shifted[:, 18:24] += module.lofit_offset[0].detach()
    shifted[:, 0:6] += module.lofit_offset[1].detach()
    assert_close(module(x), layer(shifted))


def test_selection_leaves_the_model_unchanged_and_patch_is_exact_at_init():
    model = tiny_model("qwen2")  # GQA (4 query heads, 2 kv heads) with q/k/v biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids(1)
    with torch.no_grad():
        want = model(x).logits
    report = fastft.patch(model, fastft.LoFiTConfig(heads=3, calib=[batch(0), batch(2)], select_steps=4))
    modules = lofit_modules(model)
    assert sum(len(m.heads) for m in modules.values()) == 3
    assert report.trainable_params == 3 * 16
    assert all(m.head_dim == 16 and m.in_features == 4 * 16 for m in modules.values())  # query heads of o_proj
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)
    assert all(p.grad is None for p in model.parameters())
    fastft.unpatch(model, merge=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_selection_is_deterministic_and_saved(tmp_path):
    base = tiny_model("llama", torch.float64)
    config = fastft.LoFiTConfig(heads=0.25, calib=batch(), select_steps=3)
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    plans = [fastft.patch(m, config) for m in models]
    assert [m.heads for m in lofit_modules(models[0]).values()] == [m.heads for m in lofit_modules(models[1]).values()]
    model = models[0]
    with torch.no_grad():
        for m in lofit_modules(model).values():
            m.lofit_offset.normal_()
    fastft.save(model, tmp_path)
    fresh = copy.deepcopy(base)
    fastft.load(fresh, tmp_path)  # the saved config holds the selection: no calib needed
    x = ids(3)
    with torch.no_grad():
        want = model(x).logits
        assert_close(fresh(x).logits, want)
        fastft.unpatch(fresh, merge=True)  # offsets fold into o_proj's bias
        assert not fastft.is_patched(fresh)
        assert all(fresh.get_submodule(n).bias is not None for n in lofit_modules(model))
        assert_close(fresh(x).logits, want)
        fastft.unpatch(model, merge=False)
        assert_close(model(x).logits, base(x).logits)
    del plans


def test_given_selection_and_training_lowers_the_loss():
    model = tiny_model("llama")
    fastft.patch(model, fastft.LoFiTConfig(selected={0: [1, 3], 1: [2]}))
    assert {n: m.heads for n, m in lofit_modules(model).items()} == {
        "model.layers.0.self_attn.o_proj": (1, 3), "model.layers.1.self_attn.o_proj": (2,)}
    x = ids(4, 4, 12)
    losses = training_losses(model, x, lr=5e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "needs calib"),
    (dict(heads=0, selected={0: [1]}), "heads"),
    (dict(heads=1.5, selected={0: [1]}), "heads"),
    (dict(selected={0: []}), "selected"),
    (dict(selected={"x": [1]}), "selected"),
    (dict(calib=3), "calib"),
    (dict(calib={"input_ids": None}, selected={0: [1]}), "not both"),
    (dict(selected={0: [1]}, select_steps=0), "select_steps"),
    (dict(selected={0: [1]}, l1=-1.0), "l1"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.LoFiTConfig(**kwargs)


def test_bad_selection_for_the_model_changes_nothing():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="do not fit"):
        fastft.patch(model, fastft.LoFiTConfig(selected={0: [7]}))  # 4 heads
    with pytest.raises(ValueError, match="no targeted"):
        fastft.patch(model, fastft.LoFiTConfig(selected={5: [0]}))
    with pytest.raises(ValueError, match="only 8"):
        fastft.patch(model, fastft.LoFiTConfig(heads=9, calib=batch()))
    assert not fastft.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
