"""Models built on the meta device: LoRA patches, and the adapters get their real initialisation when the
model is materialized; methods whose initialisation reads the weights are refused at patch time."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastft
from model_snapshot import assert_unchanged, snapshot

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)


def on_meta():
    with torch.device("meta"):
        return LlamaForCausalLM(CFG)


def load_base(model, reference):
    """Copy the base weights and buffers of ``reference`` (plain) into the patched ``model``."""
    state = dict(reference.named_parameters()) | dict(reference.named_buffers())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            source = name.replace(".base_layer.", ".")
            if source in state:
                tensor.copy_(state[source])


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("materialize", ["to_empty", "reset_parameters"])
def test_meta_patch_then_materialize_equals_patching_the_real_model(init, materialize):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(CFG).eval()
    config = fastft.LoRAConfig(r=4, init=init)

    model = on_meta()
    report = fastft.patch(model, config)
    assert len(report.modules) == 14
    if materialize == "to_empty":  # to_empty initialises the adapters itself
        torch.manual_seed(7)
        model.to_empty(device="cpu")
    else:  # the FSDP2-style flow: materialize, then each module's reset_parameters (re-)initialises
        model.to_empty(device="cpu")
        torch.manual_seed(7)
        for module in model.modules():
            if isinstance(module, fastft.nn.LoRALinear):
                module.reset_parameters()
    load_base(model, reference)

    torch.manual_seed(7)
    fastft.patch(reference, config)
    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
        assert mine[name].requires_grad == theirs[name].requires_grad, name
    x = torch.randint(0, 64, (2, 5))
    model.eval()
    assert torch.equal(model(x).logits, reference(x).logits)
    assert all(torch.isfinite(p).all() for p in mine.values())


def test_forward_before_materializing_is_an_error():
    model = on_meta()
    fastft.patch(model, fastft.LoRAConfig(r=4, targets=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="meta device.*to_empty"):
        layer(torch.zeros(1, 32, device="meta"))


@pytest.mark.parametrize("config, match", [
    (fastft.LoRAConfig(r=4, init="pissa"), "init='pissa'"),
    (fastft.LoRAConfig(r=4, dora=True), "dora=True"),
    (fastft.S2FTConfig(ffn_ratio=0.25), "S²FT"),
    (fastft.QATConfig(rotations=()), "QAT"),
    (fastft.LoRAConfig(r=4, modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_methods_that_read_the_weights_are_refused_on_meta(config, match):
    model = on_meta()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastft.patch(model, config)
    assert_unchanged(model, before)


def test_loss_patches_on_meta():
    model = on_meta()
    fastft.patch(model, fastft.LossConfig())
    fastft.unpatch(model)
