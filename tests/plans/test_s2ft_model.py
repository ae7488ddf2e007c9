"""S²FT on whole models: co-permutation invariance, selection, training, merge, save/load, bad input."""
import copy
import itertools
import json

import pytest
import torch
from helpers import assert_close, tiny_model
from test_patch_api import assert_unchanged, snapshot

import fastft
from fastft.plans.s2ft_copermute import head_orders
from fastft.plans.s2ft import pick_channels, pick_heads
from fastft.nn import S2FTLinear
from fastft.patch import PLANNERS, patch_state

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def gqa_llama(dtype=torch.float64, seed=0):
    """8 query heads over 2 key/value heads (4 per group), head_dim 8."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).to(dtype).eval()


def logits(model, seed=0):
    with torch.no_grad():
        return model(ids(seed)).logits


def selected_entries(model):
    """{qualified weight name (unpatched naming): bool mask of the entries S²FT trains, original layout}."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, S2FTLinear):
            mask = torch.zeros(module.out_features, module.in_features, dtype=torch.bool)
            if module.rows:
                mask[module.index] = True
            else:
                mask[:, module.index] = True
            masks[f"{name}.weight"] = mask
    return masks


# ------------------------------------------------------------------------------------- invariance


MODELS = {f: (lambda f=f: tiny_model(f, torch.float64)) for f in FAMILIES}
MODELS["llama-gqa-8q-2kv"] = gqa_llama


@pytest.mark.parametrize("name", list(MODELS))
def test_co_permutation_keeps_the_logits_and_brings_the_selection_to_the_front(name):
    model = MODELS[name]()
    original = copy.deepcopy(model)
    before = logits(model)
    # 0.75 of 8 heads = 6 = one whole group of 4 plus 2 heads of the other (the partial-group case)
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.25, attn_ratio=0.75, rows=True, seed=1))
    assert_close(logits(model), before, msg="logits after co-permutation")
    torch.testing.assert_close(logits(model), before, atol=1e-10, rtol=0)
    for layer, ref in zip(model.model.layers, original.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for new, old in ((attn.o_proj, ref.self_attn.o_proj), (mlp.down_proj, ref.mlp.down_proj)):
            assert torch.equal(new.base_layer.weight[:, : new.width], old.weight[:, new.index])
        for new, old in ((attn.v_proj, ref.self_attn.v_proj), (mlp.up_proj, ref.mlp.up_proj)):
            assert torch.equal(new.base_layer.weight[: new.width], old.weight[new.index])
            if old.bias is not None:
                assert torch.equal(new.base_layer.bias[: new.width], old.bias[new.index])
    assert not torch.equal(model.model.layers[0].mlp.gate_proj.weight, original.model.layers[0].mlp.gate_proj.weight)


def test_moving_a_query_head_across_groups_changes_the_function():
    """The GQA rule is not vacuous: swapping query heads of different groups (without their key/value
    head) changes the logits, and such a selection is refused."""
    model = gqa_llama()
    before = logits(model)
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim
    swap = torch.arange(8 * hd).reshape(8, hd)[[4, 1, 2, 3, 0, 5, 6, 7]].reshape(-1)  # heads 0 <-> 4
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[swap])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, swap])
    assert (logits(model) - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot be made contiguous.*spans groups"):
        head_orders([0, 4], 8, 2)


def test_head_orders_follow_the_group_rule():
    gen = torch.Generator().manual_seed(0)
    for heads, kv in ((8, 2), (6, 3), (4, 4), (4, 1)):
        r = heads // kv
        for _ in range(60):
            k = int(torch.randint(1, heads + 1, (), generator=gen))
            chosen = torch.randperm(heads, generator=gen)[:k].tolist()
            runs = [chosen[i:i + r] for i in range(0, k, r)]
            packable = all(len({h // r for h in run}) == 1 for run in runs)
            packable &= len({run[0] // r for run in runs}) == len(runs)
            if not packable:
                with pytest.raises(ValueError):
                    head_orders(chosen, heads, kv)
                continue
            q_order, kv_order = head_orders(chosen, heads, kv)
            assert q_order[:k] == chosen
            assert sorted(q_order) == list(range(heads)) and sorted(kv_order) == list(range(kv))
            assert all(q_order[j] // r == kv_order[j // r] for j in range(heads))


@pytest.mark.parametrize("heads,kv", [(8, 2), (6, 3), (4, 4)])
def test_pick_heads_is_the_best_packable_selection(heads, kv):
    r = heads // kv
    scores = torch.rand(heads, generator=torch.Generator().manual_seed(heads + kv), dtype=torch.float64)
    for k in range(1, heads + 1):
        picked = pick_heads(scores, k, r)
        head_orders(picked, heads, kv)  # packable
        best = max(
            scores[list(s)].sum().item()
            for s in itertools.combinations(range(heads), k)
            if sum(1 for g in range(kv) if 0 < sum(h // r == g for h in s) < r) <= 1
        )
        assert len(picked) == k and abs(scores[picked].sum().item() - best) < 1e-12
    assert pick_channels(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]


def test_selection_is_deterministic_and_per_layer():
    def chosen(**kwargs):
        model = gqa_llama()
        fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.5, **kwargs))
        return patch_state(model).configs[0].indices

    first, again, other = chosen(seed=3), chosen(seed=3), chosen(seed=4)
    assert first == again and first != other
    assert chosen(seed=3, layers=[1])[1] == first[1]  # a layer's draw ignores the other layers
    assert all(len(parts["attn"]) == 4 and len(parts["ffn"]) == 9 for parts in first.values())


def test_weight_norm_picks_the_largest_columns():
    model = tiny_model("llama", torch.float64)
    down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, selection="weight_norm"))
    top = sorted(down.square().sum(0).argsort(descending=True)[:9].tolist())
    assert model.model.layers[1].mlp.down_proj.index.tolist() == top


@pytest.mark.parametrize("as_callable", [False, True], ids=["batch", "callable"])
def test_gradient_selection_uses_the_calib_gradient_and_leaves_the_model_as_it_was(as_callable):
    model = tiny_model("qwen2", torch.float64)
    batch = {"input_ids": ids(3), "labels": ids(3)}
    reference = copy.deepcopy(model)
    reference(**batch).loss.backward()
    o_grad = reference.model.layers[0].self_attn.o_proj.weight.grad
    down_grad = reference.model.layers[0].mlp.down_proj.weight.grad
    head_energy = o_grad.square().sum(0).reshape(4, 16).sum(1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.grad = torch.ones(88, 64, dtype=torch.float64)  # must survive
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calib = (lambda m: m(**batch).loss) if as_callable else batch
    config = fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.25, selection="gradient", calib=calib)
    plan = PLANNERS[fastft.S2FTConfig](model, config)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.grad, torch.ones(88, 64, dtype=torch.float64))
    assert all(p.grad is None for n, p in model.named_parameters() if "up_proj" not in n)
    chosen = plan.config.indices[0]
    assert list(chosen["attn"]) == [int(head_energy.argmax())]
    assert list(chosen["ffn"]) == sorted(down_grad.square().sum(0).argsort(descending=True)[:9].tolist())
    assert plan.config.calib is None and "calib" not in plan.config.to_dict()


# --------------------------------------------------------------------------------- training


def train_step(model, optimizer, seed=5):
    batch = ids(seed)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_training_changes_only_the_selected_entries_and_merge_keeps_the_logits(family):
    model = tiny_model(family, torch.float64)
    original = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.5, rows=True, seed=2))
    masks = selected_entries(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert report.trainable_params == sum(p.numel() for p in trainable) == sum(m.sum().item() for m in masks.values())
    assert report.total_params == sum(p.numel() for p in original.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for seed in (5, 6):
        train_step(model, optimizer, seed)
    trained_logits = logits(model)
    fastft.unpatch(model, merge=True)
    assert not any(isinstance(m, S2FTLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert_close(logits(model), trained_logits, msg="merged vs patched logits")
    reference = dict(original.named_parameters())
    for name, param in model.named_parameters():
        changed = param.detach() != reference[name].detach()
        mask = masks.get(name)
        if mask is None:
            assert not changed.any(), f"{name} changed but is not trained"
        else:
            assert torch.equal(changed, mask), f"{name}: the changed entries are not the selected ones"


def test_unpatch_without_merge_restores_the_original_bit_exactly():
    model = gqa_llama()
    before = snapshot(model)
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.2, attn_ratio=0.5, rows=True))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    train_step(model, optimizer)
    fastft.unpatch(model, merge=False)
    assert_unchanged(model, before)


def test_model_gradients_equal_full_fine_tuning_gradients_on_the_selected_entries():
    """End to end: two accumulated micro-batches; each slice gradient is the full model's gradient at
    the selected original rows/columns (the permutation and the op together)."""
    model = gqa_llama()
    full = copy.deepcopy(model)
    batches = [ids(7), ids(8)]
    for batch in batches:
        full(input_ids=batch, labels=batch).loss.backward()
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.25, rows=True, seed=1))
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
    grads = {n: p.grad for n, p in full.named_parameters()}
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, S2FTLinear)]
    assert len(modules) == 8
    for name, module in modules:
        full_grad = grads[f"{name}.weight"]
        want = full_grad[module.index] if module.rows else full_grad[:, module.index]
        assert_close(module.weight_slice.grad, want, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = tiny_model("llama", torch.float64)
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.5))
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        checkpointed.enable_input_require_grads()
    for m in (model, checkpointed):
        m.train()
        m(input_ids=ids(4), labels=ids(4)).loss.backward()
    plain = [p.grad for p in model.parameters() if p.requires_grad]
    again = [p.grad for p in checkpointed.parameters() if p.requires_grad]
    assert len(plain) == 4 and all(g is not None for g in again)
    for got, want in zip(again, plain):
        assert_close(got, want)


# ------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("selection", ["random", "gradient"])
def test_save_load_onto_the_original_base_reproduces_the_fine_tuned_model(tmp_path, selection):
    model = tiny_model("qwen2", torch.float64)
    fresh = copy.deepcopy(model)
    calib = {"input_ids": ids(1), "labels": ids(1)} if selection == "gradient" else None
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.5, rows=True, selection=selection, calib=calib))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, optimizer)
    fastft.save(model, tmp_path)
    meta = json.loads((tmp_path / "fastft_config.json").read_text())
    assert set(meta["configs"][0]["indices"]) == {"0", "1"} and "calib" not in meta["configs"][0]
    report = fastft.load(fresh, tmp_path)  # no calib needed: the saved selection is replayed
    assert len(report) == 8
    assert_close(logits(fresh), logits(model))
    fastft.unpatch(fresh, merge=True)
    fastft.unpatch(model, merge=True)
    for (name, a), (_, b) in zip(fresh.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


def test_load_refuses_a_different_selection(tmp_path):
    model = tiny_model("llama", torch.float64)
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.1, seed=0))
    fastft.save(model, tmp_path)
    other = tiny_model("llama", torch.float64)
    fastft.patch(other, fastft.S2FTConfig(ffn_ratio=0.1, seed=1))
    before = snapshot(other)
    with pytest.raises(ValueError, match="is patched with"):
        fastft.load(other, tmp_path)
    assert_unchanged(other, before)


def test_s2ft_with_lora_on_other_modules_and_refused_on_permuted_ones():
    model = tiny_model("llama", torch.float64)
    before = logits(model)
    report = fastft.patch(model, [fastft.S2FTConfig(ffn_ratio=0.1), fastft.LoRAConfig(r=2, targets=["q_proj"])])
    assert sorted({m.kind for m in report}) == ["lora", "s2ft"]
    assert_close(logits(model), before)
    fastft.unpatch(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="lora targets 'model.layers.0.mlp.up_proj', whose weight s2ft rewrites"):
        fastft.patch(model, [fastft.S2FTConfig(ffn_ratio=0.1), fastft.LoRAConfig(r=2, targets=["up_proj"])])
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ffn_ratio=1.5), r"ffn_ratio=1.5: the fraction .* in \(0, 1\]"),
        (dict(ffn_ratio=-0.1), r"ffn_ratio=-0.1"),
        (dict(attn_ratio=2), r"attn_ratio=2"),
        (dict(ffn_ratio=True), r"ffn_ratio=True"),
        (dict(ffn_ratio=0.0), "nothing would train"),
        (dict(targets=("q_proj",)), "'q_proj' is not an S²FT target"),
        (dict(targets=("down_proj",), attn_ratio=0.5), "'o_proj' is not in targets"),
        (dict(selection="magnitude"), "choose one of"),
        (dict(selection="gradient"), "needs calib="),
        (dict(calib={"input_ids": None}), "used only by selection='gradient'"),
        (dict(indices={0: {"ffn": [1], "attn": [0]}}), "entry for each active part"),
        (dict(layers=[-1]), "layer indices"),
    ],
)
def test_bad_config_values_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.S2FTConfig(**kwargs)


def opt_model():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=32)
    return tf.OPTForCausalLM(config).eval()


BAD_PATCHES = {
    "target not in the model": (opt_model, dict(), r"target 'down_proj' matches no module in OPTForCausalLM.*'fc2'"),
    "more heads than exist": (
        lambda: tiny_model("llama"), dict(attn_ratio=1.0, ffn_ratio=0.0, indices={0: {"attn": [0, 1, 2, 3, 4]}, 1: {"attn": [0, 1, 2, 3]}}),
        r"5 query heads asked, but there are only 4|layer 0 lists 5 attention heads, but the model has 4",
    ),
    "head that does not exist": (
        lambda: tiny_model("llama"), dict(attn_ratio=0.25, ffn_ratio=0.0, indices={0: {"attn": [7]}, 1: {"attn": [0]}}),
        r"query heads \[7\] do not exist",
    ),
    "GQA selection across groups": (
        gqa_llama, dict(attn_ratio=0.5, ffn_ratio=0.0, indices={0: {"attn": [0, 1, 4, 5]}, 1: {"attn": [0, 1, 2, 3]}}),
        "cannot be made contiguous",
    ),
    "indices for other layers": (
        lambda: tiny_model("llama"), dict(ffn_ratio=0.1, indices={0: {"ffn": list(range(9))}}),
        r"covers layers \[0\] but the config touches layers \[0, 1\]",
    ),
    "layer outside the model": (lambda: tiny_model("llama"), dict(layers=[0, 5]), r"\[5\] do not exist"),
}


@pytest.mark.parametrize("case", list(BAD_PATCHES))
def test_bad_patch_raises_and_leaves_the_model_unchanged(case):
    build, kwargs, match = BAD_PATCHES[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastft.patch(model, fastft.S2FTConfig(**kwargs))
    assert_unchanged(model, before)
    assert not fastft.is_patched(model)


def test_four_bit_base_is_refused_with_a_clear_error():
    from helpers import quantize_linears

    model = quantize_linears(tiny_model("llama"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="patch the unquantized model"):
        fastft.patch(model, fastft.S2FTConfig())
    assert_unchanged(model, before)


def test_benchmark_runs_and_counts_slice_flops_exactly(tmp_path):
    import csv
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[2]))  # benchmarks/ is not installed
    from benchmarks import s2ft_step, suite

    tiny = {("cpu", "quick"): (dict(hidden=64, intermediate=88, layers=1, heads=4, seq=16, batch=1, vocab=96,
                                    attn_ratio=0.25, ffn_ratio=0.125), dict(seq=[16]))}
    step = [b for b in s2ft_step.suite_benchmarks(step_sweeps=tiny) if b.name == "s2ft_step"]
    outcome = suite.run(["--quick", "--repeats", "1", "--no-progress", "--no-render", "--out", str(tmp_path)],
                        benchmarks=step)
    assert outcome.failures == []
    with open(tmp_path / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] not in ("skipped", "failed")]
    value = {(r["provider"], r["metric"]): float(r["p50"]) for r in rows}
    assert {r["provider"] for r in rows if r["metric"] == "time"} == {"fastft", "lora-same", "full"}
    # slice dW FLOPs = the slice's fraction of the full dW FLOPs of the same modules, exactly
    assert value[("fastft", "slice_dw_flops")] > 0
    assert value[("fastft", "slice_dw_share")] == value[("fastft", "slice_entry_share")]
    saved = {p: value[(p, "saved_for_backward")] for p in ("fastft", "lora-same", "full")}
    assert saved["fastft"] < saved["lora-same"] < saved["full"]
