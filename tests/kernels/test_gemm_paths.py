"""GEMM paths: the cuBLAS path of the LoRA launchers against the reference, and the path choice of the dispatch.

On a GPU ``fastft.dispatch.choose_path`` times the cuBLAS path and the fused Triton kernel once per (op, entry,
shape bucket, dtype, device) and keeps the faster; here the device and the timings are faked (the timing
function and the device signature are replaced), which checks the choice, the forcing by ``FASTFT_GEMM`` and
both caches without a GPU. The cuBLAS path itself runs on the CPU (torch's matmuls, Triton's masked products
under the interpreter) and must match the reference like the fused kernels do.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close, backend

from fastft import dispatch, gemm_paths
from fastft.ops.lora import lora_backward_reference, lora_forward_reference, lora_linear

lora_kernels = pytest.importorskip("fastft.kernels.lora")
pytest.importorskip("bitsandbytes.functional")
from test_lora_triton import CASES, backward_args, make_case  # noqa: E402  (the same cases as the fused kernels)

FAKE_GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("name", list(CASES))
def test_cublas_forward_matches_reference(name):
    args, _ = make_case(**CASES[name])
    y, xa = lora_kernels.lora_forward_cublas(*args)
    y_ref, xa_ref = lora_forward_reference(*args)
    assert y.dtype == y_ref.dtype and xa.dtype == xa_ref.dtype
    assert_close(xa, xa_ref, msg="xa")
    assert_close(y, y_ref, msg="y")


@pytest.mark.parametrize("name", list(CASES))
def test_cublas_backward_matches_reference(name):
    args, g = make_case(**CASES[name])
    bargs = backward_args(args, g)
    got, expected = lora_kernels.lora_backward_cublas(*bargs), lora_backward_reference(*bargs)
    for grad, ref, what in zip(got, expected, "dx dA dB".split()):
        assert grad.shape == ref.shape and grad.dtype == ref.dtype, what
        assert_close(grad, ref, msg=what)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dx", "dA", "dB"])
def test_cublas_backward_computes_only_what_is_needed(need):
    args, g = make_case(torch.float32, quant=("nf4", True))
    got = lora_kernels.lora_backward_cublas(*backward_args(args, g, need))
    for grad, needed in zip(got, need):
        assert (grad.numel() > 0) == needed


def test_add_lowrank_accumulates_with_the_mask():
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(19, 23, generator=gen)
    u, v = torch.randn(19, 5, generator=gen), torch.randn(5, 23, generator=gen)
    keep = torch.rand(19, 23, generator=gen) > 0.3
    expected = out + 0.7 * (u @ v) * keep / 0.7
    lora_kernels.add_lowrank(out, u, v, 0.7, keep.view(torch.uint8), 1.0 / 0.7)
    assert_close(out, expected)


# ------------------------------------------------------------------------------ the choice, faked device


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A faked device signature and timing function; returns the list of timed paths and the timings to use."""
    monkeypatch.setattr(gemm_paths, "device_signature", lambda device: "Fake GPU sm_90")
    monkeypatch.setattr(gemm_paths, "_PATH_CACHE", {})
    monkeypatch.setattr(gemm_paths, "_PATH_CACHE_LOADED", set())
    monkeypatch.delenv("FASTFT_GEMM", raising=False)
    monkeypatch.delenv("FASTFT_GEMM_CACHE", raising=False)
    state = {"times": {"cublas": 1.0, "triton": 2.0}, "timed": []}

    def fake_time(fn):
        path = fn()  # the candidates below return their own name
        state["timed"].append(path)
        if state["times"][path] is None:
            raise RuntimeError("out of resources")
        return state["times"][path]

    monkeypatch.setattr(gemm_paths, "time_call", fake_time)
    return state


def candidates():
    return {"cublas": lambda: "cublas", "triton": lambda: "triton"}


def test_cublas_is_kept_unless_the_fused_kernel_measures_faster(fake_gpu):
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("a",), candidates()) == "cublas"
    fake_gpu["times"] = {"cublas": 2.0, "triton": 1.0}
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("b",), candidates()) == "triton"
    fake_gpu["times"] = {"cublas": 1.0, "triton": 1.0}  # a tie keeps cuBLAS
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("c",), candidates()) == "cublas"
    assert fake_gpu["timed"] == ["cublas", "triton"] * 3


def test_a_choice_is_measured_once_per_bucket_and_entry(fake_gpu):
    for _ in range(3):
        assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("a",), candidates()) == "cublas"
    assert fake_gpu["timed"] == ["cublas", "triton"]
    fake_gpu["times"] = {"cublas": 2.0, "triton": 1.0}
    assert dispatch.choose_path("lora_linear", "backward", FAKE_GPU, ("a",), candidates()) == "triton"
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("a",), candidates()) == "cublas"
    assert len(fake_gpu["timed"]) == 4


def test_a_path_that_cannot_run_is_not_chosen(fake_gpu):
    fake_gpu["times"] = {"cublas": 5.0, "triton": None}
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("a",), candidates()) == "cublas"


@pytest.mark.parametrize("forced", ["cublas", "triton"])
def test_fastft_gemm_forces_a_path_without_measuring(fake_gpu, monkeypatch, forced):
    monkeypatch.setenv("FASTFT_GEMM", forced)
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("a",), candidates()) == forced
    assert fake_gpu["timed"] == []


def test_bad_fastft_gemm_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTFT_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FASTFT_GEMM"):
        dispatch.gemm_mode()


def test_off_a_gpu_nothing_is_measured(fake_gpu):
    assert dispatch.choose_path("lora_linear", "forward", torch.device("cpu"), ("a",), candidates()) == "triton"
    assert fake_gpu["timed"] == []


def test_the_json_cache_survives_the_process(fake_gpu, monkeypatch, tmp_path):
    cache = tmp_path / "paths.json"
    monkeypatch.setenv("FASTFT_GEMM_CACHE", str(cache))
    fake_gpu["times"] = {"cublas": 2.0, "triton": 1.0}
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, (((64, 70), "float32"), None), candidates()) \
        == "triton"
    stored = json.loads(cache.read_text())
    assert len(stored) == 1 and stored[0][1] == "triton"
    # a new process: empty in-process cache, the file answers; nothing is timed again
    monkeypatch.setattr(gemm_paths, "_PATH_CACHE", {})
    monkeypatch.setattr(gemm_paths, "_PATH_CACHE_LOADED", set())
    fake_gpu["timed"].clear()
    assert dispatch.choose_path("lora_linear", "forward", FAKE_GPU, (((64, 70), "float32"), None), candidates()) \
        == "triton"
    assert fake_gpu["timed"] == []
    # another device signature is measured afresh
    monkeypatch.setattr(gemm_paths, "device_signature", lambda device: "Other GPU sm_80")
    dispatch.choose_path("lora_linear", "forward", FAKE_GPU, (((64, 70), "float32"), None), candidates())
    assert fake_gpu["timed"] == ["cublas", "triton"]


def test_default_key_buckets_the_token_count():
    x, w = torch.empty(37, 8), torch.empty(5, 8)
    assert dispatch.default_path_key(x, w, None, True) == dispatch.default_path_key(torch.empty(64, 8), w, None, True)
    assert dispatch.default_path_key(x, w, None, True) != dispatch.default_path_key(torch.empty(65, 8), w, None, True)


def test_the_op_runs_the_path_the_choice_names(monkeypatch):
    """Through the op: the chooser runs the path choose_path returns, and both give the reference's result."""
    calls = []
    for name in ("lora_forward_cublas", "lora_forward", "lora_backward_cublas", "lora_backward"):
        original = getattr(lora_kernels, name)
        monkeypatch.setattr(lora_kernels, name, lambda *a, _f=original, _n=name: (calls.append(_n), _f(*a))[1])
    monkeypatch.setattr(dispatch, "_ENTRY_CACHE", {})
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    args, g = make_case(torch.float32)
    x, weight, _, _, _, _, b, A, B, scale, mask, p = args
    expected = None
    for forced in ("cublas", "triton"):
        monkeypatch.setenv("FASTFT_GEMM", forced)
        calls.clear()
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        with backend("triton"):
            y = lora_linear(xs, weight, b, As, Bs, scale, p, mask)
            y.backward(g)
        suffix = "_cublas" if forced == "cublas" else ""
        assert calls == [f"lora_forward{suffix}", f"lora_backward{suffix}"]
        got = (y.detach(), xs.grad, As.grad, Bs.grad)
        if expected is None:
            expected = got
        else:
            for a, e in zip(got, expected):
                assert_close(a, e)
    monkeypatch.setattr(dispatch, "_ENTRY_CACHE", {})
    monkeypatch.setattr(dispatch, "_RESOLVED", {})


def test_report_names_the_path(monkeypatch):
    import fastft
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8))
    monkeypatch.delenv("FASTFT_GEMM", raising=False)
    with backend("triton"):
        report = fastft.patch(model, fastft.LoRAConfig(r=2, targets=["0"]))
        assert "fused Triton GEMM" in str(report)
        monkeypatch.setenv("FASTFT_GEMM", "cublas")
        assert "triton (cuBLAS GEMM" in dispatch.path_for("lora_linear", "cpu")
    assert report.backends == {"triton": 1}


def test_report_path_on_a_faked_gpu_says_what_was_measured(fake_gpu):
    assert dispatch.path_for("lora_linear", FAKE_GPU).startswith("triton (cuBLAS GEMM + Triton epilogue;")
    dispatch.choose_path("lora_linear", "forward", FAKE_GPU, ("a",), candidates())
    fake_gpu["times"] = {"cublas": 2.0, "triton": 1.0}
    dispatch.choose_path("lora_linear", "backward", FAKE_GPU, ("a",), candidates())
    assert dispatch.path_for("lora_linear", FAKE_GPU) == \
        "triton (measured: cuBLAS GEMM + Triton epilogue x1, fused Triton GEMM x1)"
    assert dispatch.path_for("s2ft_linear", FAKE_GPU).startswith("triton (cuBLAS GEMM")
