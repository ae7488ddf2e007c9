"""The sparse methods inside a real transformers Trainer run: FastFTCallback runs SpIEL's cycles and Diff
Pruning's fixing step with the Trainer's optimizer; the L0 penalty reaches the Trainer's loss."""
import pytest
import torch
from helpers import TokenData, tiny_model

import fastft
from fastft.integrations import FastFTCallback
from fastft.nn.sparse_delta import SparseDeltaLinear

transformers = pytest.importorskip("transformers")


def _train(model, tmp_path, steps):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    lines = []
    callback = FastFTCallback(log=lines.append)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(n=24, length=12), callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return callback, lines, losses, trainer


def test_trainer_runs_spiel_cycles(tmp_path):
    model = tiny_model("llama").train()
    fastft.patch(model, fastft.SparseConfig(method="spiel", density=0.05, targets=["q_proj", "down_proj"],
                                            regrow_every=2, prune_fraction=0.25))
    modules = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    start = [m.delta_indices.clone() for m in modules]
    callback, lines, losses, trainer = _train(model, tmp_path, 6)  # (random batches: the loss-falls check is in tests/plans)
    assert callback.events == [(2, "sparse"), (4, "sparse")]  # not after the last step (6)
    assert sum("SpIEL cycle" in line for line in lines) == 2
    assert all(not torch.equal(m.delta_indices, s) for m, s in zip(modules, start))
    optimizer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(m.delta_values) in optimizer_params for m in modules)  # the same Parameter objects


def test_trainer_diff_pruning_fixes_the_gates(tmp_path):
    model = tiny_model("llama").train()
    fastft.patch(model, fastft.SparseConfig(method="diff-pruning", density=0.05, targets=["down_proj"],
                                            fix_at_step=3, final_density=0.5, l0_weight=1e-3))
    callback, lines, losses, _ = _train(model, tmp_path, 4)
    assert callback.events == [(3, "sparse")]
    for m in model.modules():
        if isinstance(m, SparseDeltaLinear):
            assert m.value_transform.fixed
            assert bool((m.delta_values.detach()[m.value_transform.fixed_mask == 0] == 0).all())
