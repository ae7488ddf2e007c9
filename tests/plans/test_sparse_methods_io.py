"""The sparse methods beside the rest of fastft: save / load, exported deltas applied and composed, merged state
dicts, LoRA in the same patch, the Trainer callback, gradient checkpointing, the meta device."""
import types

import pytest
import torch
from sparse_helpers import config_for, make_batch, sparse_modules, snapshot, train_steps

import fastft
from fastft.plans.sparse import sparse_schedules
from helpers import tiny_model


@pytest.mark.parametrize("method", ["spiel", "diff-pruning", "mft", "sct", "lt-sft", "gmt"])
def test_save_load_round_trip(method, tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    options = {"regrow_every": 2} if method == "spiel" else {"fix_at_step": 3} if method == "diff-pruning" else {}
    fastft.patch(model, config_for(method, **options))
    train_steps(model, 4)
    batch = make_batch(3)
    with torch.no_grad():
        expected = model(**batch).logits
    fastft.save(model, tmp_path)
    fresh = tiny_model()
    fastft.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected)
    for (_, a), (_, b) in zip(sparse_modules(model), sparse_modules(fresh)):
        assert torch.equal(a.delta_indices, b.delta_indices)
    merged = fastft.unpatch(fresh, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_sparse_beside_lora_in_one_patch():
    model = tiny_model()
    report = fastft.patch(model, [fastft.LoRAConfig(r=4, targets=["v_proj"]),
                                  fastft.SparseConfig(method="sara", targets=["down_proj"], density=0.05)])
    assert {r.kind for r in report.modules} == {"lora", "sparse"}
    losses, _ = train_steps(model, 6)
    assert losses[-1] < losses[0]
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LoRALinear", "SparseDeltaLinear"} <= kinds


def test_the_trainer_callback_runs_the_schedule():
    from fastft.integrations import FastFTCallback

    model = tiny_model()
    fastft.patch(model, config_for("spiel", regrow_every=2))
    _, optimizer = train_steps(model, 1, schedule=False)
    model.train()
    model(**make_batch()).loss.backward()
    callback = FastFTCallback(log=None)
    (schedule,) = sparse_schedules(model)
    state = types.SimpleNamespace(global_step=1, max_steps=10, is_world_process_zero=True)
    callback.on_step_end(None, state, None, model=model, optimizer=optimizer)
    assert schedule.cycle == 0
    state.global_step = 2
    callback.on_step_end(None, state, None, model=model, optimizer=optimizer)
    assert schedule.cycle == 1 and callback.events == [(2, "sparse")]
    off = FastFTCallback(log=None, sparse_schedule=False)
    state.global_step = 4
    off.on_step_end(None, state, None, model=model, optimizer=optimizer)
    assert schedule.cycle == 1
    fastft.unpatch(model)
    assert sparse_schedules(model) == []


def test_a_meta_model_is_refused_naming_the_sparse_method():
    import transformers as tf
    from helpers import tiny_config

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tiny_config("llama"))
    with pytest.raises(ValueError, match="sparse fine-tuning \\(method='sara'\\)"):
        fastft.patch(model, fastft.SparseConfig(method="sara", targets=["q_proj"]))
    assert not fastft.is_patched(model)


@pytest.mark.parametrize("method", ["diff-pruning", "mft", "gmt"])
def test_exported_deltas_compose_onto_the_base(method, tmp_path):
    """A method's sparse delta exported as a file (its effective values: after gates / masks) applied to the
    plain base gives the patched model's eval logits; two fine-tunings compose by addition and revert exactly."""
    torch.manual_seed(0)
    model = tiny_model()
    fastft.patch(model, config_for(method, **({"score_init": 0.05, "density": 0.3} if method == "mft" else {})))
    train_steps(model, 4, lr=0.1 if method == "mft" else 1e-2)
    other = tiny_model()
    fastft.patch(other, fastft.SparseConfig(method="random", targets=["v_proj"], density=0.05, seed=3))
    train_steps(other, 3)
    batch = make_batch(3)
    with torch.no_grad():
        expected = model(**batch).logits
    fastft.save_sparse_delta(model, tmp_path / "task.safetensors")
    fastft.save_sparse_delta(other, tmp_path / "lang.safetensors")
    base = tiny_model()
    original = snapshot(base)
    fastft.apply_sparse_delta(base, tmp_path / "task.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    fastft.apply_sparse_delta(base, tmp_path / "lang.safetensors")  # composition: both deltas added
    for (name, m) in sparse_modules(other):
        torch.testing.assert_close(base.get_submodule(name).weight, original[f"{name}.weight"] + m.delta_weight())
    fastft.revert_sparse_delta(base, tmp_path / "lang.safetensors")
    fastft.revert_sparse_delta(base, tmp_path / "task.safetensors")
    after = base.state_dict()
    for key in original:
        torch.testing.assert_close(after[key], original[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["spiel", "diff-pruning", "mft"])
def test_merged_state_dict_of_a_method_with_edits(method):
    """Methods whose plans carry a schedule or a loss term merge like the others: fastft.merged_state_dict equals
    the state of unpatch(merge=True)."""
    torch.manual_seed(0)
    model = tiny_model()
    fastft.patch(model, config_for(method, **({"fix_at_step": 2} if method == "diff-pruning" else {})))
    train_steps(model, 3)
    merged = fastft.merged_state_dict(model)
    expected = fastft.unpatch(model, merge=True).state_dict()
    assert set(merged) == set(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])


def test_gradient_checkpointing_gives_the_same_candidate_gradients():
    ids = make_batch()["input_ids"]
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        fastft.patch(model, config_for("spiel"))
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([t.clone() for _, m in sparse_modules(model) for t in (m.candidate_gradients(), m.delta_values.grad)])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_save_load_of_sparse_beside_lora(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    configs = [fastft.LoRAConfig(r=4, targets=["v_proj"]),
               fastft.SparseConfig(method="diff-pruning", targets=["down_proj"], density=0.05)]
    fastft.patch(model, configs)
    train_steps(model, 2)
    batch = make_batch(3)
    with torch.no_grad():
        expected = model(**batch).logits
    fastft.save(model, tmp_path)
    fresh = tiny_model()
    fastft.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected)
