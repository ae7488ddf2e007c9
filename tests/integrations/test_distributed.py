"""Multi-process training on this machine: 2 processes, gloo over loopback, launched with torchrun and with
``accelerate launch``, under DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every run trains through ``fastft.examples.train_distributed`` (the script the README tells users to copy;
launched as ``-m fastft.examples.train_distributed``, except the torchrun FSDP2 runs, which
tests/integrations/distributed_worker.py drives through the script's ``train`` after its own checks, to save a launch):
a small random Llama, patched, then wrapped / sharded, trains a few steps on a global batch of 4 sequences
split 2 + 2 between the ranks. Checked for each method:

* the engine really ran (the script prints DDP, or how many trainable tensors FSDP2 sharded);
* the adapters end bit-identical on both ranks (a fingerprint of the gathered tensors, printed per rank);
* the per-step loss (averaged over the ranks) and the saved adapters equal a one-process run over the same
  global batches (run here, in this process), within the float32 entry of the tolerance table.

Why a tolerance and not bit equality with one process: the gradient of every adapter is a sum over the
global batch's tokens. One process sums them inside one GEMM; two processes sum each half in their own
GEMM, then add the halves in gloo's all-reduce (DDP) or reduce-scatter (FSDP2) and halve the result. The
same numbers are added in a different order, so float32 rounding differs (measured: ~5e-7 relative after
three steps). The runs use plain SGD: Adam divides by the gradient's running RMS, which blows a rounding
difference in a near-zero gradient entry up to the size of a whole step, and would hide a wrong gradient
scale (a sum instead of a mean across ranks) that SGD exposes.

The float32-adapters-on-a-bfloat16-base run (FSDP2 all-gathers mixed dtypes) is compared on the update
``Δ = trained − initial``: bf16 GEMMs over different row blocks round differently at every step (8
significant bits), measured ‖Δ_2proc − Δ_1proc‖ / ‖Δ_1proc‖ ≈ 0.005; the bound is 0.05, while a wrong
reduction (a missing or doubled gradient) moves it to 0.5 or more.

Each launch has a 120 s timeout; rendezvous ports are free ones picked by the launchers (torchrun
``--standalone``, accelerate ``--main_process_port 0``), so parallel runs do not collide.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import TOLERANCES
from safetensors.torch import load_file

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no torch.distributed / gloo backend", allow_module_level=True)
pytest.importorskip("transformers")

TIMEOUT_S = 120
STEPS = 3
COMMON = ["--optimizer", "sgd", "--lr", "0.5", "--steps", str(STEPS), "--batch", "4", "--seq", "16"]
EXAMPLE = ["-m", "fastft.examples.train_distributed"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "0"]
ACCELERATE_FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]


def launch(command: list[str], cwd) -> str:
    """Run a launcher (its own process group, killed whole on timeout); return stdout, or fail with the logs:
    the lines of stderr that report an error first, then the tails (the whole logs stay in ``cwd``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        failure = f"exit code {process.returncode}" if process.returncode != 0 else None
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        failure = f"timed out after {TIMEOUT_S}s"
    if failure:
        with open(os.path.join(cwd, "launch.log"), "w") as log:
            log.write(f"{' '.join(command)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        errors = [line for line in stderr.splitlines()
                  if re.search(r"error|exception|terminate|abort|signal|killed", line, re.I)]
        pytest.fail(f"{failure}: {' '.join(command)}\n--- stderr lines reporting errors\n" + "\n".join(errors[:40])
                    + f"\n--- stdout (tail)\n{stdout[-3000:]}\n--- stderr (tail)\n{stderr[-6000:]}")
    return stdout


def parse(stdout: str, method: str) -> dict:
    """The engine line, the per-step losses and the per-rank fingerprints the script printed for ``method``."""
    engine = re.findall(rf"^{method} engine: (.*)$", stdout, re.M)
    losses = [float(v) for v in re.findall(rf"^{method} step \d+: loss ([-\d.e+]+)$", stdout, re.M)]
    ranks = dict(re.findall(rf"^{method} rank (\d+): \w+ (\w+)$", stdout, re.M))
    return {"engine": engine[0] if engine else None, "losses": losses, "ranks": ranks}


def run_in_process(args: list[str]) -> str:
    """The one-process reference: the same script, in this process (same seeds, the whole global batch)."""
    from fastft.examples import train_distributed

    buffer = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(buffer):
        train_distributed.main(args)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs: float32 (every method), and bfloat16 base (trained, and the initial adapters)."""
    root = tmp_path_factory.mktemp("reference")
    methods = "lora,dora,qat-lora,loss,s2ft,full-loss"
    out32 = run_in_process(["--method", methods, *COMMON, "--out", str(root / "f32")])
    out16 = run_in_process(["--method", "lora,dora", *COMMON, "--dtype", "bfloat16", "--out", str(root / "bf16")])
    run_in_process(["--method", "lora,dora", *COMMON, "--dtype", "bfloat16", "--steps", "0",
                    "--out", str(root / "bf16-init")])
    return {"root": root, "float32": out32, "bfloat16": out16}


def adapters(directory, method: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, method, "fastft_adapter.safetensors"))


def check_run(stdout: str, out_dir, reference: dict, methods: list[str], engine: str) -> None:
    tol = TOLERANCES[torch.float32]
    for method in methods:
        got, ref = parse(stdout, method), parse(reference["float32"], method)
        assert got["engine"] is not None and got["engine"].startswith(engine), (method, got["engine"])
        assert sorted(got["ranks"]) == ["0", "1"], f"{method}: fingerprints {got['ranks']}"
        assert got["ranks"]["0"] == got["ranks"]["1"], f"{method}: the ranks' trained tensors differ"
        assert len(got["losses"]) == len(ref["losses"]) == STEPS, (got["losses"], ref["losses"])
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), **tol,
                                   msg=lambda m: f"{method}: losses per step\n{m}")
        if method == "full-loss":  # no adapters: the losses carry the check
            continue
        ours, theirs = adapters(out_dir, method), adapters(reference["root"] / "f32", method)
        assert ours.keys() == theirs.keys() and ours
        for key in ours:
            assert ours[key].dtype == torch.float32 or key.endswith(".index")  # S²FT's slice positions
            torch.testing.assert_close(ours[key], theirs[key], **tol, msg=lambda m: f"{method} {key}\n{m}")


def test_torchrun_ddp(tmp_path, reference):
    methods = ["lora", "dora", "qat-lora", "loss", "s2ft"]
    stdout = launch([*TORCHRUN, *EXAMPLE, "--engine", "ddp", "--method", ",".join(methods), *COMMON,
                     "--out", str(tmp_path)], tmp_path)
    check_run(stdout, tmp_path, reference, methods, "DistributedDataParallel")


@pytest.fixture(scope="module")
def torchrun_fsdp2(tmp_path_factory):
    """One torchrun launch of tests/integrations/distributed_worker.py: the API checks on shards, then FSDP2 training
    through the example's ``train`` in float32 and over a bfloat16 base."""
    out = tmp_path_factory.mktemp("fsdp2")
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    stdout = launch([*TORCHRUN, worker, str(out), "float32=lora,dora,loss", "bfloat16=lora,dora", "--", *COMMON], out)
    before, _, rest = stdout.partition("=== float32\n")
    float32, _, bfloat16 = rest.partition("=== bfloat16\n")
    return {"out": out, "checks": before, "float32": float32, "bfloat16": bfloat16}


def test_torchrun_fsdp2(torchrun_fsdp2, reference):
    stdout = torchrun_fsdp2["float32"]
    check_run(stdout, torchrun_fsdp2["out"] / "float32", reference, ["lora", "dora", "loss"], "FSDP2")
    assert "FSDP2: 3 fully_shard units, 28 trainable tensors sharded" in parse(stdout, "lora")["engine"]
    assert "42 trainable tensors sharded" in parse(stdout, "dora")["engine"]  # A, B and the magnitude


def test_torchrun_fsdp2_float32_adapters_on_bfloat16_base(torchrun_fsdp2, reference):
    stdout = torchrun_fsdp2["bfloat16"]
    for method in ("lora", "dora"):
        got = parse(stdout, method)
        assert got["engine"].startswith("FSDP2") and got["ranks"]["0"] == got["ranks"]["1"]
        ours = adapters(torchrun_fsdp2["out"] / "bfloat16", method)
        theirs = adapters(reference["root"] / "bf16", method)
        start = adapters(reference["root"] / "bf16-init", method)
        assert all(t.dtype == torch.float32 for t in ours.values())
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], **TOLERANCES[torch.bfloat16])
        ours_update = torch.cat([(ours[k] - start[k]).flatten() for k in sorted(ours)])
        their_update = torch.cat([(theirs[k] - start[k]).flatten() for k in sorted(ours)])
        assert their_update.norm() > 0
        error = ((ours_update - their_update).norm() / their_update.norm()).item()
        assert error < 0.05, f"{method}: relative error of the update {error:.3g}"


def test_fastft_functions_on_sharded_and_wrapped_models(torchrun_fsdp2):
    """save / load / export_peft / adapter_state_dict on FSDP2 shards and through DDP; the refusals."""
    checks = re.findall(r"^CHECK (.*) ok$", torchrun_fsdp2["checks"], re.M)
    assert len(checks) == 6, torchrun_fsdp2["checks"][-4000:]


def test_accelerate_ddp(tmp_path, reference):
    methods = ["lora", "dora"]
    stdout = launch([*ACCELERATE, "--multi_gpu", *EXAMPLE, "--engine", "accelerate", "--method", ",".join(methods),
                     *COMMON, "--out", str(tmp_path)], tmp_path)
    check_run(stdout, tmp_path, reference, methods, "DistributedDataParallel")


def test_accelerate_fsdp2(tmp_path, reference):
    """accelerate's FSDP2 wrapping: each decoder layer, the embeddings, and [final norm, lm_head] are their own
    units, so the fused loss runs as an FSDP forward method of lm_head (full-loss trains lm_head too)."""
    methods = ["lora", "dora", "full-loss"]
    stdout = launch([*ACCELERATE, *ACCELERATE_FSDP2, *EXAMPLE, "--engine", "accelerate", "--method",
                     ",".join(methods), *COMMON, "--out", str(tmp_path)], tmp_path)
    check_run(stdout, tmp_path, reference, methods, "FSDP2")
    assert "6 fully_shard units" in parse(stdout, "lora")["engine"]
