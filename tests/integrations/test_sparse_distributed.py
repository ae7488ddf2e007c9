"""Sparse deltas (issue #17) under DDP and FSDP2: 2 processes, gloo on CPU, one torchrun launch of
tests/integrations/sparse_distributed_worker.py, each rank training on its half of every global batch of 4
sequences (tests/integrations/sparse_training.py: a tiny Llama, 5 SGD steps).

Checked against a one-process run over the whole global batches (run here, in this process):

* ``method="random"`` (a fixed support) under DDP and FSDP2 (``delta_values`` sharded on dim 0, the indices a
  replicated buffer): both ranks end with identical indices and values; the indices equal the reference's,
  the values and per-step losses equal it within the float32 tolerance (the gradient's halves are summed in a
  different order: see tests/integrations/test_distributed.py);
* ``method="spiel"`` under DDP (cycles after steps 2 and 4): after each cycle both ranks hold the same indices,
  equal to the reference's: the regrow picks by the candidate gradients summed over the processes (an
  all-reduce in ``SparseSchedule.regrow``), which rank the candidates like the one-process gradient of the
  whole batch; the final values as above;
* SpIEL under FSDP2 is refused with a ValueError that names DDP (its cycles rewrite sharded tensors in place).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import TOLERANCES, tiny_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_training as run  # noqa: E402
from test_distributed import TORCHRUN, launch  # noqa: E402

RUNS = ["ddp:random", "ddp:spiel", "fsdp2:random", "fsdp2:spiel"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse-dist")
    worker = os.path.join(os.path.dirname(__file__), "sparse_distributed_worker.py")
    launch([*TORCHRUN, worker, str(out), *RUNS], out)
    return {spec: [torch.load(out / f"{spec.replace(':', '-')}-rank{r}.pt") for r in (0, 1)] for spec in RUNS}


@pytest.fixture(scope="module")
def reference():
    out = {}
    for method in ("random", "spiel"):
        cycles = {}
        with torch.random.fork_rng():
            model = run.patched(tiny_model, method)
            on_cycle = lambda step: cycles.__setitem__(step, {k: v for k, v in run.snapshot(model).items()  # noqa: E731
                                                              if k.endswith(".indices")})
            losses = run.train(model, model, slice(0, run.BATCH), on_cycle)
        out[method] = {"final": run.snapshot(model), "losses": losses, "cycles": cycles}
    return out


@pytest.mark.parametrize("spec", ["ddp:random", "ddp:spiel", "fsdp2:random"])
def test_ranks_agree_and_equal_one_process_on_the_whole_batch(launched, reference, spec):
    rank0, rank1 = launched[spec]
    ref = reference[spec.split(":")[1]]
    tol = TOLERANCES[torch.float32]
    assert "error" not in rank0 and "error" not in rank1, rank0.get("error")
    assert rank0["final"].keys() == rank1["final"].keys() == ref["final"].keys() and ref["final"]
    for key in ref["final"]:  # the ranks: bit-identical; the reference: indices exact, values within tolerance
        assert torch.equal(rank0["final"][key], rank1["final"][key]), f"{spec}: ranks differ at {key}"
        if key.endswith(".indices"):
            assert torch.equal(rank0["final"][key], ref["final"][key]), f"{spec}: {key} differs from one process"
        else:
            assert rank0["final"][key].abs().max() > 0, f"{spec}: {key} never trained"
            torch.testing.assert_close(rank0["final"][key], ref["final"][key], **tol, msg=lambda m: f"{spec} {key}\n{m}")
    # each rank's loss is on its half: their mean is the global batch's loss
    mean = (torch.tensor(rank0["losses"]) + torch.tensor(rank1["losses"])) / 2
    torch.testing.assert_close(mean, torch.tensor(ref["losses"]), **tol)


def test_spiel_regrow_picks_the_same_indices_on_both_ranks_as_one_process(launched, reference):
    rank0, rank1 = launched["ddp:spiel"]
    ref = reference["spiel"]
    assert sorted(ref["cycles"]) == sorted(rank0["cycles"]) == sorted(rank1["cycles"]) == [2, 4]
    start = {k: v for k, v in run.snapshot(run.patched(tiny_model, "spiel")).items() if k.endswith(".indices")}
    for step, expected in ref["cycles"].items():
        for key, indices in expected.items():
            assert torch.equal(rank0["cycles"][step][key], rank1["cycles"][step][key]), (step, key)
            assert torch.equal(rank0["cycles"][step][key], indices), f"cycle after step {step}: {key}"
    moved = [k for k in start if not torch.equal(start[k], ref["cycles"][2][k])]
    assert moved, "the first cycle moved no support: the check would not see a wrong regrow"


def test_spiel_under_fsdp2_is_refused_with_a_clear_error(launched):
    for result in launched["fsdp2:spiel"]:
        assert "SpIEL under FSDP2 is not supported" in result.get("error", ""), result.keys()
        assert "DDP" in result["error"]
