"""fastft.patch / unpatch / save / load: what gets patched, what is frozen, reversibility, bad input."""
import copy

import pytest
import torch
from helpers import assert_close, assert_model_unchanged, model_snapshot, randomize_lora, tiny_model, written_out_merges
from torch import nn

import fastft
from fastft.nn import LoRALinear


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


# the shared whole-model snapshot (tests/helpers.py); test_s2ft_model imports these names from here
snapshot = model_snapshot
assert_unchanged = assert_model_unchanged


def test_all_linear_patches_every_decoder_linear_and_freezes_the_rest():
    model = tiny_model("llama")
    report = fastft.patch(model, fastft.LoRAConfig(r=4))
    names = [m.name for m in report]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert "lm_head" not in " ".join(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "torch" in text and "trainable params" in text


def test_suffixes_regex_layers_and_lm_head():
    model = tiny_model("llama")
    report = fastft.patch(model, fastft.LoRAConfig(targets=["q_proj", "lm_head"], layers=[1]))
    assert [m.name for m in report] == ["model.layers.1.self_attn.q_proj", "lm_head"]
    fastft.unpatch(model)
    report = fastft.patch(model, fastft.LoRAConfig(targets=r"model\.layers\.0\.mlp\.(up|down)_proj"))
    assert [m.name for m in report] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_unpatch_merge_folds_the_update_and_restores_flags():
    model = tiny_model("qwen2", torch.float64)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=6))  # s = alpha/r = 1.5: a dropped scale shows
    randomize_lora(model)
    expected = written_out_merges(model, alpha=6, r=4)  # W + (6/4)·B·A
    with torch.no_grad():
        patched_logits = model(ids()).logits
    fastft.unpatch(model, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    state = model.state_dict()
    assert len(expected) == 14
    for key, weight in expected.items():
        assert_close(state[key], weight, msg=key)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert_close(model(ids()).logits, patched_logits)


def test_unpatch_without_merge_restores_the_original_model():
    model = tiny_model("llama", torch.float64)
    before = snapshot(model)
    fastft.patch(model, fastft.LoRAConfig(r=4, init="pissa"))
    randomize_lora(model)
    fastft.unpatch(model, merge=False)
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    for name, (_, tensor, _, _, flag, _) in after["tensors"].items():
        torch.testing.assert_close(tensor, before["tensors"][name][1], atol=1e-12, rtol=0)
        assert flag == before["tensors"][name][4], name


def test_save_load_onto_a_fresh_model(tmp_path):
    model = tiny_model("mistral", torch.float64)
    fresh = copy.deepcopy(model)
    config = fastft.LoRAConfig(r=3, alpha=6, targets=["k_proj", "up_proj"], train_a=False)
    fastft.patch(model, config)
    randomize_lora(model)
    fastft.save(model, tmp_path)
    report = fastft.load(fresh, tmp_path)
    assert len(report) == 4
    with torch.no_grad():
        assert_close(fresh(ids()).logits, model(ids()).logits)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if n.endswith("lora_A"))


def test_pissa_save_load(tmp_path):
    model = tiny_model("llama", torch.float64)
    fresh = copy.deepcopy(model)
    fastft.patch(model, fastft.LoRAConfig(r=4, init="pissa", targets=["o_proj"]))
    randomize_lora(model)
    fastft.save(model, tmp_path)
    fastft.load(fresh, tmp_path)
    with torch.no_grad():
        assert_close(fresh(ids()).logits, model(ids()).logits)


def test_train_a_false_trains_only_B():
    model = tiny_model("llama")
    report = fastft.patch(model, fastft.LoRAConfig(r=4, train_a=False))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_B"}
    assert report.trainable_params == sum(m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))


def test_from_linear_on_a_bare_linear():
    layer = nn.Linear(10, 7)
    lora = LoRALinear.from_linear(layer, fastft.LoRAConfig(r=2))
    x = torch.randn(3, 10)
    assert_close(lora(x), layer(x))  # B starts at zero
    assert lora.base_layer is layer


def test_dropout_is_active_in_training_only():
    layer = LoRALinear.from_linear(nn.Linear(16, 16), fastft.LoRAConfig(r=4, dropout=0.5))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(first, layer(x))


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "rank must be a positive integer"),
        (dict(r=-3), "rank must be a positive integer"),
        (dict(r=2.5), "rank must be a positive integer"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(alpha=-1.0), "alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(init="loftq"), "choose one of"),
        (dict(targets=[]), "non-empty list"),
        (dict(targets="q_proj("), "regular expression"),
        (dict(layers=[-1]), "layer indices"),
    ],
)
def test_bad_config_values_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.LoRAConfig(**kwargs)


def test_unknown_target_names_the_modules_that_exist():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'q_prj' matches no module.*'down_proj'.*'q_proj'"):
        fastft.patch(model, fastft.LoRAConfig(targets=["v_proj", "q_prj"]))
    assert_unchanged(model, before)


def test_plain_name_as_regex_suggests_a_list():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"targets=\['q_proj'\]"):
        fastft.patch(model, fastft.LoRAConfig(targets="q_proj"))
    assert_unchanged(model, before)


def test_target_that_is_not_linear():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp' \(LlamaMLP\), which is not a linear layer"):
        fastft.patch(model, fastft.LoRAConfig(targets=["q_proj", "mlp"]))
    assert_unchanged(model, before)


def test_layers_outside_the_stack():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"has 2 layers.*\[5\] do not exist"):
        fastft.patch(model, fastft.LoRAConfig(layers=[0, 5]))
    assert_unchanged(model, before)


def test_patching_twice_is_refused_and_leaves_the_first_patch():
    model = tiny_model("llama")
    fastft.patch(model, fastft.LoRAConfig(r=2, targets=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already patched by fastft"):
        fastft.patch(model, fastft.LoRAConfig(r=4))
    assert_unchanged(model, before)


def test_failed_pissa_patch_restores_weights():
    model = tiny_model("llama")
    before = snapshot(model)
    # q_proj (64x64) comes first and is built (its weight becomes the residual); k_proj (32x64) then fails
    with pytest.raises(ValueError, match="r <= min"):
        fastft.patch(model, fastft.LoRAConfig(r=40, init="pissa", targets=["q_proj", "k_proj"]))
    assert_unchanged(model, before)


def test_wrong_input_width_is_a_clear_error():
    model = tiny_model("llama")
    fastft.patch(model, fastft.LoRAConfig(r=2))
    layer = model.model.layers[0].self_attn.q_proj
    before = snapshot(model)
    with pytest.raises(ValueError, match="last dimension is 63 but this layer takes 64"):
        layer(torch.randn(2, 63))
    assert_unchanged(model, before)


def test_not_a_config_and_not_patched():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(TypeError, match="not a fastft config"):
        fastft.patch(model, dict(r=4))
    with pytest.raises(ValueError, match="not patched"):
        fastft.unpatch(model)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="nn.Linear and bitsandbytes Linear4bit"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1), fastft.LoRAConfig())
