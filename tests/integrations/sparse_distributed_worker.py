"""Run by tests/integrations/test_sparse_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU):
sparse-delta training (tests/integrations/sparse_training.py) under each ``engine:method`` given, each rank on
its half of every global batch. Rank r saves ``OUT/<engine>-<method>-rank<r>.pt``: the final indices and
values, the losses, and the indices after every SpIEL cycle; or the message of a ValueError (a refusal).

    torchrun --nproc_per_node 2 tests/integrations/sparse_distributed_worker.py OUT ddp:random ddp:spiel
"""
from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # tests/ (helpers) and tests/integrations/ (sparse_training)
import sparse_training as run  # noqa: E402
from helpers import tiny_model  # noqa: E402


def main(out: str, runs: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    half = run.BATCH // dist.get_world_size()
    for spec in runs:
        engine, method = spec.split(":")
        model = run.patched(tiny_model, method)
        if engine == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            wrapped = model
        cycles = {}
        on_cycle = lambda step: cycles.__setitem__(step, {k: v for k, v in run.snapshot(model).items()  # noqa: E731
                                                          if k.endswith(".indices")})
        try:
            losses = run.train(model, wrapped, slice(rank * half, (rank + 1) * half), on_cycle)
            result = {"final": run.snapshot(model), "losses": losses, "cycles": cycles}
        except ValueError as error:  # a refusal (SpIEL under FSDP2): the test checks its message
            result = {"error": str(error)}
        torch.save(result, os.path.join(out, f"{engine}-{method}-rank{rank}.pt"))
        del wrapped, model
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
