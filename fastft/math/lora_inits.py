"""Data-dependent initialisations of low-rank factors: PiSSA's top-r SVD, LoLDU's LDU split and CorDA's
covariance-aware SVD.

Pure math on a weight W (out×in, float) and, for CorDA, the covariance C (in×in) of the layer's inputs. Each
function returns factors (A: r×in, B: out×r, and LoLDU's diagonal d) such that the adapter's initial product
``s · B diag(d) A`` (d = 1 for CorDA) is a rank-r piece of W; the caller keeps the residual ``W - s·B diag(d) A``
as the frozen base, so the model is unchanged at init.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CORDA_MODES", "corda_factors", "corda_sample_covariance", "loldu_factors", "pissa_factors"]

CORDA_MODES = ("kpm", "ipm")


def pissa_factors(weight: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor]:
    """PiSSA (Meng et al. 2024): the top-r singular triplets of W, ``W ≈ U Σ Vᵀ``. Returns ``(A, B)`` with
    ``A = √(Σ/s) Vᵀ``, ``B = U √(Σ/s)`` (in ``weight``'s dtype), so ``s · B A`` is W's best rank-r piece."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def loldu_factors(weight: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """LoLDU (Shi et al. 2024): ``W = P L D U`` (LU with partial pivoting, L unit lower, D diagonal, U unit upper).

    Returns ``(A, B, d)`` = ``(U[:r], (P L)[:, :r], D[:r] / scale)``, so ``scale · B diag(d) A`` is the first r
    components of the decomposition. A pivot of exactly zero keeps its U row unnormalised and gets d = 0.
    """
    P, L, U = torch.linalg.lu(weight)
    pivots = torch.diagonal(U)[:r]
    safe = torch.where(pivots == 0, torch.ones_like(pivots), pivots)
    A = U[:r] / safe[:, None]
    B = (P @ L)[:, :r]
    d = torch.where(pivots == 0, torch.zeros_like(pivots), pivots) / scale
    return A.contiguous(), B.contiguous(), d.contiguous()


def corda_sample_covariance(sample: Tensor) -> Tensor:
    """One sample's contribution ``X̂ᵀ X̂`` (in×in, float32) with ``X̂ = X / |max(X)|`` (X: tokens×in).

    This is the normalisation of the CorDA reference code as PEFT (0.2x, ``calib_cov_distribution``) runs it:
    each sample (one row of a batch) is divided by the absolute value of its largest entry; the covariance is
    the mean of these products over the samples.
    """
    x = sample.detach().reshape(-1, sample.shape[-1]).float()
    x = x / torch.max(x).abs()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("init='corda': a calibration activation is NaN or inf (or a sample is all zeros); "
                         "check the calibration batch.")
    return x.t() @ x


def corda_factors(weight: Tensor, covariance: Tensor, r: int, mode: str, scale: float) -> tuple[Tensor, Tensor]:
    """CorDA (Yang et al. 2024): SVD of ``W C`` (C the input covariance, damped until invertible), then
    ``W = U Σ (Vᵀ C⁻¹)``. ``mode="ipm"`` (instruction-previewed) takes the r largest singular triplets,
    ``"kpm"`` (knowledge-preserved) the r smallest. Returns ``(A, B)`` with ``A = √(Σ/s) (C⁻¹ V)ᵀ``,
    ``B = U √(Σ/s)``.

    Damping as PEFT's ``collect_eigens_for_layer``: ``C + δ·mean(diag C)·I`` with δ = 0.01, doubled until
    ``‖C_δ C_δ⁻¹ - I‖_F < 0.05``; computed in float32 (``weight`` and ``covariance`` are cast).
    """
    if mode not in CORDA_MODES:
        raise ValueError(f"corda mode {mode!r}: choose one of {list(CORDA_MODES)}")
    w = weight.float()
    cov = covariance.float()
    eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
    damp = 0.01
    for _ in range(64):
        fixed = cov + eye * torch.mean(torch.diagonal(cov)) * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ValueError("init='corda': the calibration covariance could not be made invertible by damping; "
                         "use more (or more varied) calibration samples.")
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ inverse).t()
    picked = slice(None, r) if mode == "ipm" else slice(-r, None)
    U, S, V = U[:, picked], S[picked] / scale, V[:, picked]
    root = S.sqrt()
    return (V.t() * root[:, None]).contiguous(), (U * root[None, :]).contiguous()
