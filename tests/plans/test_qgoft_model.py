"""qGOFT on a tiny Llama: identity at init, the regularizer in output.loss, training, merge, save/load, bad configs."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, tiny_model

import fastft
from fastft.nn import QGOFTLinear
from fastft.plans.regularization import HOOK_ATTR, regularization_loss


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QGOFTLinear):
                for p in m.adapter_parameters().values():
                    p.add_(torch.randn(p.shape, generator=gen) * std)


def test_identity_at_init_report_and_unpatch():
    model = tiny_model("llama")
    before = model(ids()).logits
    report = fastft.patch(model, fastft.QGOFTConfig())
    layers = [m for m in model.modules() if isinstance(m, QGOFTLinear)]
    assert len(layers) == 14 and "qgoft" in str(report)
    assert any("padded from 88" in m.report_detail() for m in layers)  # down_proj: 88 -> 128
    assert_close(model(ids()).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("theta", "scale", "delta") for n in trainable)
    fastft.unpatch(model, merge=False)
    assert not any(isinstance(m, QGOFTLinear) for m in model.modules()) and HOOK_ATTR not in model.__dict__
    assert_close(model(ids()).logits, before)


def test_training_lowers_the_loss_with_the_regularizer_in_output_loss():
    torch.manual_seed(0)
    model = tiny_model("llama")
    fastft.patch(model, fastft.QGOFTConfig(orthogonality_weight=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    batch = ids(1, (4, 12))
    model.train()
    losses = []
    for _ in range(12):
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    term = regularization_loss(model)
    assert term is not None and term.item() > 0  # the adjustments moved; the term is live
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(model(batch).logits[:, :-1].reshape(-1, 96), batch[:, 1:].reshape(-1))
        assert_close(model(input_ids=batch, labels=batch).loss, plain + regularization_loss(model))
        model.eval()
        assert_close(model(input_ids=batch, labels=batch).loss, plain)


def test_merge_reproduces_the_patched_model():
    model = tiny_model("llama")
    fastft.patch(model, fastft.QGOFTConfig(targets=["q_proj", "down_proj", "o_proj"]))
    perturb(model)
    expected = model(ids()).logits
    fastft.unpatch(model, merge=True)
    assert not any(isinstance(m, QGOFTLinear) for m in model.modules())
    assert_close(model(ids()).logits, expected)


def test_save_and_load(tmp_path):
    model = tiny_model("llama")
    config = fastft.QGOFTConfig(targets=["v_proj", "up_proj"], stages=3, relative_angle=False)
    fastft.patch(model, config)
    perturb(model, seed=4)
    expected = model(ids()).logits
    fastft.save(model, tmp_path)
    fresh = tiny_model("llama")
    fastft.load(fresh, tmp_path)
    assert_close(fresh(ids()).logits, expected)
    layer = next(m for m in fresh.modules() if isinstance(m, QGOFTLinear))
    assert layer.stages == 3 and layer.delta is None and layer.scale is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(stages=0), "stages"), (dict(stages=2.5), "stages"), (dict(orthogonality_weight=-1), "orthogonality_weight"),
    (dict(orthogonality_weight=float("nan")), "orthogonality_weight"), (dict(learn_scale="yes"), "learn_scale"),
    (dict(relative_angle=1), "relative_angle"), (dict(targets=[]), "targets"), (dict(layers=[-1]), "layers"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.QGOFTConfig(**kwargs)
    with pytest.raises(TypeError, match="arguments are"):
        fastft.QGOFTConfig(rank=4)


def test_too_many_stages_for_a_layer_changes_nothing():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at most 6 stages"):
        fastft.patch(model, fastft.QGOFTConfig(stages=7))  # q_proj: 64 inputs, 6 stages
    assert not any(isinstance(m, QGOFTLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_regularizer_hook_for_exact_rotations():
    model = tiny_model("llama")
    fastft.patch(model, fastft.QGOFTConfig(learn_scale=False, relative_angle=False))
    assert HOOK_ATTR not in model.__dict__ and regularization_loss(model) is None


def test_transformers_trainer_run_lowers_the_loss(tmp_path):
    """The transformers Trainer on one repeated batch (4 sequences): the logged loss, regularizer included, falls."""
    import transformers
    from helpers import TokenData

    torch.manual_seed(0)
    model = tiny_model("llama")
    fastft.patch(model, fastft.QGOFTConfig(orthogonality_weight=0.01))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=2e-2, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(n=4))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    assert regularization_loss(model).item() > 0
