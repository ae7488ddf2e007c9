"""Shared pieces of the sparse-method tests (tests/plans/test_sparse_methods*.py): a tiny Llama's batch, the
config of each method with its required inputs, a short training loop that runs the sparse schedules."""
import torch

import fastft
from fastft.nn.sparse_delta import SparseDeltaLinear
from fastft.plans.sparse import sparse_schedules
from helpers import tiny_model

TARGETS = ["q_proj", "down_proj"]


def make_batch(seed=0, batch=2, seq=12):
    ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def sparse_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def config_for(method, **options):
    defaults = {"targets": TARGETS, "density": 0.05}
    if method == "lt-sft":
        defaults["phase1"] = phase1_weights(tiny_model())
    if method == "sct":
        defaults["calib"] = [make_batch(5)]
    defaults.update(options)
    return fastft.SparseConfig(method=method, **defaults)


def phase1_weights(model, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return {n: m.weight.detach() + 0.01 * torch.randn(m.weight.shape, generator=gen)
            for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}


METHODS = ["spiel", "lt-sft", "diff-pruning", "sara", "gmt", "mft", "sct", "magnitude", "random"]


def train_steps(model, steps, lr=1e-2, schedule=True, batch=None):
    batch = batch or make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if schedule:
            for s in sparse_schedules(model):
                s.step(model, step, optimizer)
    model.eval()
    return losses, optimizer
