"""In-place safety: no fastft op saves for backward a tensor it returns. Model code may modify a layer's output in
place (Falcon: ``mlp_output += attention_output``); every kind of patched layer must then still backpropagate,
and to the same gradients as when the add is out of place."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastft
from fastft.nn import DoRALinear, LoRALinear, QuantLinear, S2FTLinear


def _layers(kind: str, bias: bool, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias).double()
    if bias:
        with torch.no_grad():
            base.bias.normal_()
    if kind != "qat":  # the base stays frozen, as fastft.patch leaves it
        base.requires_grad_(False)
    if kind in ("lora", "dora"):
        cfg = fastft.LoRAConfig(r=4, alpha=8, dropout=dropout, dora=kind == "dora")
        layer = LoRALinear.from_linear(base, cfg)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.3)
            if kind == "dora":
                layer.lora_magnitude_vector.mul_(1.5)
        return layer
    if kind == "dora_exact_norm":
        layer = DoRALinear(base, fastft.LoRAConfig(r=4, alpha=8, dora=True, dora_detach_norm=False))
        with torch.no_grad():
            layer.lora_B.normal_(std=0.3)
        return layer
    if kind == "qat":
        return QuantLinear(base, fastft.QATConfig(w_bits=4, a_bits=8, group_size=8, rotations=()))
    if kind == "s2ft":
        return S2FTLinear(base, 6)
    raise ValueError(kind)


KINDS = ["lora", "dora", "dora_exact_norm", "qat", "s2ft"]


def _grads(layer: nn.Module, inplace: bool, seed: int = 3):
    torch.manual_seed(seed)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 5, 20, dtype=torch.float64)
    torch.manual_seed(seed + 1)  # the same dropout mask in both runs
    y = layer(x)
    if inplace:
        y += residual  # what Falcon, GPT-J and others do to a layer's output
        y.mul_(0.5)
    else:
        y = (y + residual) * 0.5
    (y.square().sum() + y.sum()).backward()
    params = [p for p in layer.parameters() if p.requires_grad]
    out = [x.grad.clone()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_inplace_add_after_every_kind_of_layer(kind, bias):
    layer = _layers(kind, bias)
    layer.train()
    reference = _grads(layer, inplace=False)
    actual = _grads(layer, inplace=True)
    assert len(reference) == len(actual) > 1
    for a, r in zip(actual, reference):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_inplace_add_with_dropout(kind):
    layer = _layers(kind, bias=True, dropout=0.25)
    layer.train()
    reference = _grads(layer, inplace=False)
    actual = _grads(layer, inplace=True)
    for a, r in zip(actual, reference):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_dora_never_saves_its_output():
    """The saved tensors of a DoRA forward share no storage with the tensor the layer returns."""
    layer = _layers("dora", bias=True)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    storages = {t.untyped_storage().data_ptr() for t in saved if t.numel()}
    assert y.untyped_storage().data_ptr() not in storages


def test_falcon_dora_trains():
    """The model the issue saw fail: Falcon (parallel attention, in-place add into the MLP output) with DoRA."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             new_decoder_architecture=False, parallel_attn=True, bias=True)
    model = tf.FalconForCausalLM(config)
    fastft.patch(model, fastft.LoRAConfig(r=4, dora=True))
    ids = torch.randint(0, 64, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
