"""``QGOFTLinear``: quasi-Givens orthogonal fine-tuning (qGOFT, Ma et al., ICML 2024) of a linear layer.

The frozen weight W (out × in) is transformed on its input side by M, a butterfly of Givens-like 2×2 blocks
over the ``in`` features (``fastft/math/givens.py``)::

    y = x (W M)ᵀ + b = (x Mᵀ) Wᵀ + b            M = B_{S-1} ⋯ B_1 B_0,  stage s pairs features (i, i + 2^s)

so the layer rotates the *activations* (``fastft.ops.givens_rotation``: a memory-bound N × in pass, fused over
all stages) and then runs the frozen GEMM unchanged (cuBLAS). This is OFT's side: OFT and qGOFT write the
fine-tuned weight as ``R W₀`` with W₀ (in × out, the transpose of torch's W) and R ∈ SO(in), i.e. torch's
``W Rᵀ``; here M plays Rᵀ (any orthogonal R is reached as well by M = Rᵀ). Rotating the activations rather than
W means no out × in product in forward (W M would be O(out·in·S) a step) and, above all, no weight gradient:
the blocks' gradient is a reduction of the N × in activations (``Σ_tokens gu·u``...), where rotating W would
need the full ``dW' = gᵀ x`` (2·N·out·in FLOPs) to reach the angles.

Each 2×2 block of pair p, stage s (columns are the images of the pair's two unit vectors)::

    B = [[α_u cos θ, -α_v sin(θ + δ)],
         [α_u sin θ,  α_v cos(θ + δ)]]

θ the Givens angle; α_u, α_v the *norm adjustments* (``learn_scale``); δ the *relative angle adjustment*
(``relative_angle``): the second column turns by θ + δ, so the two columns are no longer orthogonal. With
α = 1 and δ = 0 the block is an exact Givens rotation and M ∈ SO(in). Identity at init: θ = δ = 0, α = 1.
The soft orthogonality regularizer (``regularization()``), summed over live blocks and weighted, is the
closed form of ``‖BᵀB − I‖²_F`` per block::

    ‖BᵀB − I‖²_F = (α_u² − 1)² + (α_v² − 1)² + 2 α_u² α_v² sin² δ

(``fastft.plans.regularization`` adds it to ``output.loss`` while training). It is a per-block penalty (zero
exactly when every block is orthogonal, hence M orthogonal); it is not ‖MᵀM − I‖² of the product.

Feature counts that are not a power of two: the butterfly runs over P = 2^⌈log2 in⌉ with zero padding; a pair
whose partner lies in the padding is dead and kept at the identity block (its parameters exist, are masked
out and get zero gradient), so M maps R^in to itself and every stage is disjoint 2×2 maps and identities.
``stages`` (default log2 P) below log2 P mixes features only within aligned groups of 2^stages.

Merge: ``W' = W M`` (``unpatched(merge=True)``), computed in float64 as the op's input-gradient map applied to
W's rows (no in × in matrix). Parameters: θ (S × P/2), and when enabled α (S × 2 × P/2), δ (S × P/2).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..math.givens import butterfly_width, live_pairs, max_stages
from ..ops.givens_rotation import givens_rotation, givens_rotation_backward_reference
from ..targets import is_conv1d, linear_features, out_in_weight
from .layer import FastFTLayer, WrapsLinear

_PARAMS = ("theta", "scale", "delta")


def quasi_givens_blocks(theta: Tensor, scale: Optional[Tensor], delta: Optional[Tensor], live: Tensor) -> Tensor:
    """The (S, 4, P/2) blocks [a, b, c, e] of the module docstring; dead pairs are identity blocks."""
    phi = theta if delta is None else theta + delta
    su = 1.0 if scale is None else scale[:, 0]
    sv = 1.0 if scale is None else scale[:, 1]
    blocks = torch.stack((su * torch.cos(theta), -sv * torch.sin(phi), su * torch.sin(theta), sv * torch.cos(phi)), 1)
    eye = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=blocks.dtype, device=blocks.device)[None, :, None]
    return torch.where(live[:, None, :], blocks, eye)


def soft_orthogonality(scale: Optional[Tensor], delta: Optional[Tensor], live: Tensor) -> Optional[Tensor]:
    """Σ over live blocks of ‖BᵀB − I‖²_F in closed form; None when every block is exactly orthogonal."""
    if scale is None and delta is None:
        return None
    term = 0.0
    su2 = 1.0 if scale is None else scale[:, 0].float() ** 2
    sv2 = 1.0 if scale is None else scale[:, 1].float() ** 2
    if scale is not None:
        term = (su2 - 1) ** 2 + (sv2 - 1) ** 2
    if delta is not None:
        term = term + 2 * su2 * sv2 * torch.sin(delta.float()) ** 2
    return torch.where(live, term, torch.zeros((), device=live.device)).sum()


class QGOFTLinear(WrapsLinear, FastFTLayer):
    """``y = (x Mᵀ) Wᵀ + b`` with M the trainable quasi-Givens butterfly over the input features.

    Args:
        base_layer: ``nn.Linear`` (float weight) or transformers ``Conv1D``; kept frozen as ``base_layer``.
        stages: butterfly stages S (1 <= S <= log2 P, P = 2^⌈log2 in⌉); None: log2 P (every feature mixes).
        learn_scale: train the norm adjustments α (2 per block).
        relative_angle: train the relative angle adjustments δ (1 per block).
        orthogonality_weight: λ of the soft orthogonality term ``λ Σ ‖BᵀB − I‖²_F`` (0 drops it).
    """

    op = "givens_rotation"
    kind = "qgoft"

    def __init__(self, base_layer: nn.Module, stages: Optional[int] = None, learn_scale: bool = True,
                 relative_angle: bool = True, orthogonality_weight: float = 1e-3):
        super().__init__()
        if not ((isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)) and base_layer.weight.is_floating_point()):
            raise TypeError(
                f"fastft qGOFT patches nn.Linear layers (and transformers' Conv1D) with float weights; got "
                f"{type(base_layer).__name__}. A bitsandbytes Linear4bit cannot hold the merged rotation."
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        P = butterfly_width(self.in_features)
        top = max_stages(self.in_features)
        S = top if stages is None else stages
        if isinstance(S, bool) or not isinstance(S, int) or not 1 <= S <= top:
            raise ValueError(
                f"QGOFTLinear: stages={stages!r} for {self.in_features} input features; use 1 <= stages <= {top} "
                f"(log2 of the padded width {P}) or None."
            )
        self.stages = S
        self.learn_scale = learn_scale
        self.relative_angle = relative_angle
        self.orthogonality_weight = float(orthogonality_weight)
        weight = base_layer.weight
        opts = dict(dtype=torch.float32, device=weight.device)
        self.register_buffer("live", live_pairs(self.in_features, S).to(weight.device), persistent=False)
        self.theta = nn.Parameter(torch.zeros(S, P // 2, **opts))
        self.scale = nn.Parameter(torch.ones(S, 2, P // 2, **opts)) if learn_scale else None
        self.delta = nn.Parameter(torch.zeros(S, P // 2, **opts)) if relative_angle else None

    # What model code reads of the layer it replaced.
    def blocks(self) -> Tensor:
        """The current (S, 4, P/2) float32 blocks of the butterfly."""
        return quasi_givens_blocks(self.theta, self.scale, self.delta, self.live)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension is {x.shape[-1]} but this layer takes "
                f"{self.in_features} features (input shape {tuple(x.shape)})."
            )
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        z = givens_rotation(x.to(dtype), self.blocks())
        weight = out_in_weight(self.base_layer).to(dtype)
        bias = self.base_layer.bias
        return torch.nn.functional.linear(z, weight, None if bias is None else bias.to(dtype))

    def regularization(self) -> Optional[Tensor]:
        if self.orthogonality_weight == 0:
            return None
        term = soft_orthogonality(self.scale, self.delta, self.live)
        return None if term is None else self.orthogonality_weight * term

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W M (out × in) in W's dtype, computed in float64 (the rows of W through the transposed stages)."""
        weight = out_in_weight(self.base_layer)
        w64 = weight.detach().to(torch.float64)
        merged, _ = givens_rotation_backward_reference(w64, w64, self.blocks().to(torch.float64), True, False)
        return merged.to(weight.dtype)

    def unpatched(self, merge: bool) -> nn.Module:
        if merge:
            merged = self.merged_weight()
            with torch.no_grad():
                out_in_weight(self.base_layer).copy_(merged)
        return self.base_layer

    # ----------------------------------------------------------------- adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name in _PARAMS if (p := getattr(self, name)) is not None}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach().clone() for name, p in self.adapter_parameters().items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        mine = self.adapter_parameters()
        if set(state) != set(mine):
            raise ValueError(f"qGOFT state has keys {sorted(state)}, expected {sorted(mine)}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(mine[name].shape):
                raise ValueError(f"{name}: saved shape {tuple(value.shape)} != {tuple(mine[name].shape)}")
        with torch.no_grad():
            for name, value in state.items():
                mine[name].copy_(value)

    def trainable_count(self) -> int:
        """Live parameters (dead pairs of a padded butterfly excluded)."""
        per_pair = 1 + (2 if self.learn_scale else 0) + (1 if self.relative_angle else 0)
        return int(self.live.sum()) * per_pair

    def report_detail(self) -> str:
        parts = [f"{self.stages} stages over {butterfly_width(self.in_features)}"]
        if self.in_features != butterfly_width(self.in_features):
            parts.append(f"padded from {self.in_features}")
        adj = [n for n, on in (("norm", self.learn_scale), ("relative angle", self.relative_angle)) if on]
        parts.append("+".join(adj) if adj else "exact rotations")
        if self.orthogonality_weight and adj:
            parts.append(f"λ={self.orthogonality_weight:g}")
        if self.in_features != butterfly_width(self.in_features):
            parts.append(f"{self.trainable_count()} live params")
        return ", ".join(parts)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.report_detail()}"
