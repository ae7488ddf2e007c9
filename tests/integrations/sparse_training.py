"""The sparse-delta training run shared by tests/integrations/sparse_distributed_worker.py (each rank, on its half
of every global batch, under DDP or FSDP2) and tests/integrations/test_sparse_distributed.py (the one-process
reference on the whole global batch): same seeds, same model, same batches, plain SGD.
"""
from __future__ import annotations

import torch

import fastft
from fastft.nn.sparse_delta import SparseDeltaLinear
from fastft.plans.sparse import sparse_schedules

STEPS = 5
BATCH, SEQ, VOCAB = 4, 16, 96
CONFIGS = {
    "random": dict(method="random", density=0.05, seed=3),
    "spiel": dict(method="spiel", density=0.05, seed=3, regrow_every=2, prune_fraction=0.25, candidate_factor=2.0),
}


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def patched(tiny_model, method: str):
    model = tiny_model("llama", torch.float32)
    fastft.patch(model, fastft.SparseConfig(**CONFIGS[method]))
    return model


def sparse_layers(model) -> list[tuple[str, SparseDeltaLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]


def train(model, wrapped, rows: slice, on_cycle=None) -> list[float]:
    """STEPS SGD steps of ``wrapped`` (the model, or its DDP / FSDP2 wrapping) on ``rows`` of each global batch;
    the sparse schedule runs after every step (``on_cycle(step)`` after each step that ran a SpIEL cycle)."""
    schedules = sparse_schedules(model)  # none for a fixed support
    assert len(schedules) == (model_method(model) == "spiel")
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    losses = []
    wrapped.train()
    for step in range(1, STEPS + 1):
        ids = global_batch(step)[rows]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        done = [d for s in schedules for d in s.step(model, step, optimizer, final=step == STEPS)]
        if done and on_cycle is not None:
            on_cycle(step)
    return losses


def model_method(model) -> str:
    return "spiel" if any(m.candidate_indices is not None for _, m in sparse_layers(model)) else "fixed"


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an FSDP2 shard gathered)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every layer's indices and values (gathered), detached copies."""
    out = {}
    for name, module in sparse_layers(model):
        out[f"{name}.indices"] = full(module.delta_indices).detach().clone()
        out[f"{name}.values"] = full(module.delta_values).detach().clone()
    return out
