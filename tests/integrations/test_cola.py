"""Chain of LoRA (fastft.integrations.merge_and_restart): the function is unchanged at the merge, the adapters
restart as at patch time, their optimizer state is fresh (AdamW), and what cannot be merged is refused."""
import copy

import pytest
import torch
from helpers import TOLERANCES, assert_model_unchanged, model_snapshot, quantize_linears, randomize_lora, tiny_model

import fastft
from fastft.integrations import merge_and_restart
from fastft.nn import LoRALinear

IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))

METHODS = {
    "lora": lambda: fastft.LoRAConfig(r=4),
    "dora": lambda: fastft.LoRAConfig(r=4, dora=True),
    "pissa": lambda: fastft.LoRAConfig(r=4, init="pissa"),
    "qat+lora": lambda: [fastft.QATConfig(w_bits=4, a_bits=8, group_size=16), fastft.LoRAConfig(r=4)],
    "lora-head+loss": lambda: [fastft.LoRAConfig(r=4, targets=["q_proj", "lm_head"]), fastft.LossConfig()],
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, labels=IDS, return_logits=True).logits if hasattr(
            model, "_fastft_fused_loss") else model(input_ids=IDS).logits


@pytest.mark.parametrize("method,dtype", [(m, torch.float64) for m in METHODS] + [("dora", torch.float32)])
def test_merge_and_restart_keeps_the_function(method, dtype):
    model = tiny_model("llama", dtype)
    fastft.patch(model, METHODS[method]())
    randomize_lora(model)
    base = copy.deepcopy(model)
    fastft.unpatch(base, merge=False)
    before = logits(model)
    assert (before - logits(base)).abs().max() > 1e-2  # the adapters do something
    names = merge_and_restart(model, seed=5)
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(logits(model), before, **TOLERANCES[dtype])
    for name in names:
        module = model.get_submodule(name)
        if module.init == "pissa":  # PiSSA restarts from the merged weight's principal factors
            torch.testing.assert_close(module.lora_B, module.pissa_B0)
        else:
            assert torch.count_nonzero(module.lora_B) == 0 and torch.count_nonzero(module.lora_A) > 0
    if method == "qat+lora":
        return  # QAT's unpatch(merge=False) restores the weights kept at patch time: it drops the chain too
    # the chain is in the base weights now: dropping the fresh adapters or merging them is the same
    merged = copy.deepcopy(model)
    fastft.unpatch(model, merge=False)
    fastft.unpatch(merged, merge=True)
    torch.testing.assert_close(logits(model), logits(merged), **TOLERANCES[dtype])


def test_restart_is_seeded_and_leaves_the_rng_alone():
    models = [tiny_model("llama"), tiny_model("llama")]
    for model in models:
        fastft.patch(model, fastft.LoRAConfig(r=4))
        randomize_lora(model)
    torch.manual_seed(123)
    merge_and_restart(models[0], seed=9)
    after = torch.rand(3)
    torch.manual_seed(123)
    merge_and_restart(models[1], seed=9)
    assert torch.equal(torch.rand(3), after)  # the training RNG stream is not consumed
    for (_, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b)  # every process of a data-parallel run draws the same adapters


def test_optimizer_state_is_fresh_for_the_new_adapters_only():
    """S²FT slices (FFN) and LoRA (attention) in one model: the LoRA adapters restart with AdamW state of a
    brand-new optimizer; the S²FT slice keeps its moments; the learning rate is untouched."""
    model = tiny_model("llama")
    fastft.patch(model, [fastft.S2FTConfig(ffn_ratio=0.1), fastft.LoRAConfig(r=4, targets=["q_proj", "v_proj"])])
    randomize_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    def step(model, optimizer, scheduler=None):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    for _ in range(2):
        step(model, optimizer, scheduler)
    lr = optimizer.param_groups[0]["lr"]
    names = merge_and_restart(model, optimizer, seed=1)
    adapters = {id(p) for n in names for p in model.get_submodule(n).adapter_parameters().values()}
    slices = [p for p in params if id(p) not in adapters]
    assert slices and all(id(p) not in optimizer.state for p in params if id(p) in adapters)
    assert all(int(optimizer.state[p]["step"]) == 2 for p in slices)
    assert optimizer.param_groups[0]["lr"] == lr

    # one more step: the adapters move exactly as a new AdamW would move freshly initialised parameters
    twin = copy.deepcopy(model)
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    fresh = torch.optim.AdamW(twin_params, lr=lr, weight_decay=0.1)
    step(model, optimizer, scheduler)
    step(twin, fresh)
    for (name, p), q in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], twin_params):
        if id(p) in adapters:
            torch.testing.assert_close(p, q, **TOLERANCES[torch.float32], msg=name)
            assert int(optimizer.state[p]["step"]) == 1
    assert all(int(optimizer.state[p]["step"]) == 3 for p in slices)


def test_refusals_change_nothing():
    model = tiny_model("llama")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="patched by fastft"):
        merge_and_restart(model)
    assert_model_unchanged(model, before)
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1))
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="no low-rank adapter"):
        merge_and_restart(model)
    assert_model_unchanged(model, before)

    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes; install fastft[test]")
    qmodel = quantize_linears(tiny_model("llama"))
    fastft.patch(qmodel, fastft.LoRAConfig(r=4))
    randomize_lora(qmodel)
    before = model_snapshot(qmodel)
    with pytest.raises(ValueError, match="4-bit"):
        merge_and_restart(qmodel)
    assert_model_unchanged(qmodel, before)


def test_refusing_an_unrelated_optimizer_changes_nothing():
    other = tiny_model("llama")
    fastft.patch(other, fastft.LoRAConfig(r=4))
    unrelated = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    before = model_snapshot(other)
    with pytest.raises(ValueError, match="holds none of the adapter"):
        merge_and_restart(other, unrelated)
    assert_model_unchanged(other, before)
