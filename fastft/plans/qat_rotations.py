"""Rotation folding for quantization (QuaRot / SpinQuant layout), over the layout of :mod:`fastft.plans.qat_layout`.

A decoder model is *computationally invariant* under an orthogonal change of basis of its residual
stream once every RMSNorm has lost its scale: ``rms(x Q) = rms(x)``. Writing every rotation as a matrix
``Q`` acting on row vectors (``x ↦ x Q``), the layout is

    RMSNorm scale  folded into the linear layers that read the norm's output: ``W ← W · diag(g)``, the norm's
                   scale set to 1 (Llama, Qwen2, Mistral: ``g = w``; Gemma's ``(1 + w)`` norm: ``g = 1 + w``).
    R1 (Q₁, hidden×hidden, a Hadamard with seeded random signs) on the residual stream:
        embeddings ``E ← E Q₁``; layers reading it (q/k/v, gate/up, lm_head) ``W ← W Q₁``;
        layers writing it (o_proj, down_proj) ``W ← Q₁ᵀ W``, ``b ← b Q₁``.
    R2 (Q₂, head_dim×head_dim, per head) on the values: ``v_proj`` rows of head h ``W_h ← Q₂ᵀ W_h``,
        ``b_h ← b_h Q₂``; ``o_proj`` input columns of head h ``W[:, h] ← W[:, h] Q₂``.
    R3 online (queries and keys after RoPE: ``q Q₃ (k Q₃)ᵀ = q kᵀ``): nothing to fold; see
        :mod:`fastft.nn.qat`.
    R4 (Q₄ over the intermediate size) online on ``down_proj``'s input, ``W_down ← W_down Q₄``.

Every Hadamard rotation here is ``Q = diag(s) · Hᵀ`` with ``H`` the orthonormal Hadamard matrix of
:func:`fastft.ops.hadamard.hadamard_matrix`, so ``x Q = hadamard_transform(x ⊙ s)`` — R3 and R4 have
``s = 1`` and are exactly the online ``hadamard_transform``. Folding runs the O(d log d) transform over
the weights, in float32 (float64 for float64 weights), then rounds once to the weight's dtype.

:func:`fastft.plans.qat_layout.model_layout` walks Llama, Qwen2 (q/k/v biases), Mistral and Gemma (tied
embeddings: folding unties ``lm_head`` from ``embed_tokens``, since ``lm_head`` also carries the final norm's
scale and they can no longer be one matrix; unpatching ties them again). :class:`RotationFolding` is the
reversible edit.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.hadamard import hadamard_transform
from .qat_layout import ModelLayout
from .registry import Edit

class Rotation:
    """``Q = diag(s) · Hᵀ`` (d×d, orthogonal) acting on row vectors; ``s`` random ±1 (seeded) or all ones.

    ``right(x) = x Q`` and ``right_t(x) = x Qᵀ`` over the last dimension; ``left_t(W) = Qᵀ W`` and
    ``left(W) = Q W`` over the first.
    """

    def __init__(self, size: int, seed: int | None = None):
        self.size = size
        self.signs = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            self.signs = torch.randint(0, 2, (size,), generator=gen, dtype=torch.int64).mul(2).sub(1)

    def _signs(self, x: Tensor) -> Tensor | None:
        return None if self.signs is None else self.signs.to(device=x.device, dtype=x.dtype)

    def right(self, x: Tensor) -> Tensor:
        signs = self._signs(x)
        return hadamard_transform(x if signs is None else x * signs)

    def right_t(self, x: Tensor) -> Tensor:
        y = hadamard_transform(x, inverse=True)
        signs = self._signs(x)
        return y if signs is None else y * signs

    def left_t(self, w: Tensor) -> Tensor:
        return self.right(w.t()).t()

    def left(self, w: Tensor) -> Tensor:
        return self.right_t(w.t()).t()

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense Q (for tests and calibration)."""
        return self.right(torch.eye(self.size, dtype=dtype))


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rewrite(t: Tensor, fn) -> None:
    """``t ← fn(t)`` in place, computed in float32 (float64 for float64) and rounded once."""
    with torch.no_grad():
        t.copy_(fn(t.detach().to(compute_dtype(t))).to(t.dtype))


def per_head(rotation: Rotation, x: Tensor, heads: int, fn: str) -> Tensor:
    """Apply ``rotation.<fn>`` to each head's block of the last dimension of ``x`` (size heads·head_dim)."""
    lead = x.shape[:-1]
    y = getattr(rotation, fn)(x.reshape(*lead, heads, rotation.size))
    return y.reshape(*lead, heads * rotation.size)


def rotate_head_rows(rotation: Rotation, w: Tensor, heads: int, inverse: bool = False) -> Tensor:
    """``W_h ← Qᵀ W_h`` for each head's block of rows (``Q W_h`` with ``inverse``)."""
    return per_head(rotation, w.t(), heads, "right_t" if inverse else "right").t()


@dataclass
class RotationFolding(Edit):
    """The reversible edit folding norm scales, R1, R2 and R4 into a model's weights (see the module doc).

    ``apply`` rewrites the weights in place. ``revert`` undoes each step in reverse order: the linear
    layers (trained or merged with LoRA meanwhile) are rotated back and the norm scales moved back out
    of them (``W[:, j] / g_j``; a norm with a zero in its scale keeps it folded, with a warning: the
    rotated layers may have learned to use the input it zeroes), and the embeddings are rotated back; ``lm_head`` is tied again to ``embed_tokens`` when it was tied.
    The exact original values (for ``merge=False``, and for the frozen embeddings and ``lm_head``) are put
    back by the :class:`KeepOriginals` edit that precedes this one.
    """

    model: nn.Module
    layout: ModelLayout
    r1: bool
    r2: bool
    r4_layers: tuple[int, ...]
    seed: int
    _norm_scales: list[tuple[nn.Module, Tensor, Tensor]] = field(default_factory=list)
    _untied: dict[str, Any] | None = None

    @property
    def q1(self) -> Rotation:
        return Rotation(self.layout.hidden_size, seed=self.seed)

    def touched(self) -> list[tuple[str, Tensor]]:
        """Every tensor ``apply`` rewrites, with a label (for :class:`KeepOriginals`)."""
        out: list[tuple[str, Tensor]] = []
        lay = self.layout
        if self.r1:
            out.append(("embed_tokens.weight", lay.embed.weight))
            out.append(("norm.weight", lay.final_norm.weight))
            if lay.lm_head is not None and not lay.tied:
                out.append(("lm_head.weight", lay.lm_head.weight))
        for layer in lay.layers:
            linears: list[nn.Linear] = []
            if self.r1:
                out.append((f"layers.{layer.index}.input_layernorm.weight", layer.input_norm.weight))
                out.append((f"layers.{layer.index}.post_attention_layernorm.weight", layer.post_norm.weight))
                linears = layer.readers + layer.writers
            else:
                if self.r2:
                    linears += [layer.attention.v, layer.attention.o]
                if layer.index in self.r4_layers:
                    linears.append(layer.down)
            for linear in linears:
                out.append((f"layers.{layer.index}.{id(linear)}.weight", linear.weight))
                if linear.bias is not None:
                    out.append((f"layers.{layer.index}.{id(linear)}.bias", linear.bias))
        return out

    # ------------------------------------------------------------------------------------- apply
    def apply(self, model: nn.Module) -> None:
        lay = self.layout
        if self.r1:
            self._untie()
            q1 = self.q1
            self._norm_scales = []
            for layer in lay.layers:
                self._fold_norm(layer.input_norm, [layer.attention.q, layer.attention.k, layer.attention.v])
                self._fold_norm(layer.post_norm, [layer.gate, layer.up])
            if lay.lm_head is not None:
                self._fold_norm(lay.final_norm, [lay.lm_head])
                _rewrite(lay.lm_head.weight, q1.right)
            _rewrite(lay.embed.weight, q1.right)
            for layer in lay.layers:
                for linear in layer.readers:
                    _rewrite(linear.weight, q1.right)
                for linear in layer.writers:
                    _rewrite(linear.weight, q1.left_t)
                    if linear.bias is not None:
                        _rewrite(linear.bias, q1.right)
        for layer in lay.layers:
            att = layer.attention
            if self.r2:
                q2 = Rotation(att.head_dim)
                _rewrite(att.v.weight, lambda w: rotate_head_rows(q2, w, att.num_kv_heads))
                if att.v.bias is not None:
                    _rewrite(att.v.bias, lambda b: per_head(q2, b, att.num_kv_heads, "right"))
                _rewrite(att.o.weight, lambda w: per_head(q2, w, att.num_heads, "right"))
            if layer.index in self.r4_layers:
                _rewrite(layer.down.weight, Rotation(lay.intermediate_size).right)

    def _fold_norm(self, norm: nn.Module, linears: list[nn.Linear]) -> None:
        offset = self.layout.norm_offset
        scale = norm.weight.detach().to(compute_dtype(linears[0].weight)) + offset
        self._norm_scales.append((norm, scale.clone(), norm.weight.detach().clone()))
        for linear in linears:
            _rewrite(linear.weight, lambda w: w * scale.to(w)[None, :])
        with torch.no_grad():
            norm.weight.fill_(1.0 - offset)

    def _untie(self) -> None:
        lay = self.layout
        if not lay.tied:
            return
        config = self.model.config
        self._untied = {
            "tie_word_embeddings": getattr(config, "tie_word_embeddings", None),
            "all_tied_weights_keys": self.model.__dict__.get("all_tied_weights_keys"),
        }
        lay.lm_head.weight = nn.Parameter(lay.embed.weight.detach().clone(), requires_grad=False)
        config.tie_word_embeddings = False
        if self._untied["all_tied_weights_keys"] is not None:
            self.model.all_tied_weights_keys = {}

    # ------------------------------------------------------------------------------------ revert
    def revert(self, model: nn.Module, merge: bool) -> None:
        lay = self.layout
        for layer in lay.layers:
            att = layer.attention
            if layer.index in self.r4_layers:
                _rewrite(layer.down.weight, Rotation(lay.intermediate_size).right_t)
            if self.r2:
                q2 = Rotation(att.head_dim)
                _rewrite(att.o.weight, lambda w: per_head(q2, w, att.num_heads, "right_t"))
                if att.v.bias is not None:
                    _rewrite(att.v.bias, lambda b: per_head(q2, b, att.num_kv_heads, "right_t"))
                _rewrite(att.v.weight, lambda w: rotate_head_rows(q2, w, att.num_kv_heads, inverse=True))
        if not self.r1:
            return
        q1 = self.q1
        for layer in lay.layers:
            for linear in layer.writers:
                if linear.bias is not None:
                    _rewrite(linear.bias, q1.right_t)
                _rewrite(linear.weight, q1.left)
            for linear in layer.readers:
                _rewrite(linear.weight, q1.right_t)
        _rewrite(lay.embed.weight, q1.right_t)
        if lay.lm_head is not None and not self._untied:
            _rewrite(lay.lm_head.weight, q1.right_t)
        readers = {id(n): ls for n, ls in self._norm_groups()}
        kept_folded = 0
        for norm, scale, original in reversed(self._norm_scales):
            if bool((scale == 0).any()) and readers[id(norm)]:
                # a zero scale hides an input the rotated layers may have learned to use: keep the scale in
                # the layers (the norm's scale stays 1), which is exact, rather than drop that input
                kept_folded += 1
                continue
            for linear in readers[id(norm)]:
                _rewrite(linear.weight, lambda w: w / scale.to(w)[None, :])
            with torch.no_grad():
                norm.weight.copy_(original)
        if kept_folded and merge:
            warnings.warn(
                f"fastft.unpatch: {kept_folded} RMSNorm(s) have zero entries in their scale; their scales stay folded "
                "into the linear layers that follow them (the norms' scales are left at 1), which keeps the merged "
                "model exact.",
                stacklevel=3,
            )
        self._norm_scales = []
        self._retie()

    def _norm_groups(self) -> list[tuple[nn.Module, list[nn.Linear]]]:
        lay = self.layout
        groups = []
        for layer in lay.layers:
            groups.append((layer.input_norm, [layer.attention.q, layer.attention.k, layer.attention.v]))
            groups.append((layer.post_norm, [layer.gate, layer.up]))
        if lay.lm_head is not None and not self._untied:
            groups.append((lay.final_norm, [lay.lm_head]))
        elif lay.lm_head is not None:
            groups.append((lay.final_norm, []))  # lm_head is tied again to the embeddings below
        return groups

    def _retie(self) -> None:
        if not self._untied:
            return
        lay = self.layout
        lay.lm_head.weight = lay.embed.weight
        self.model.config.tie_word_embeddings = self._untied["tie_word_embeddings"]
        if self._untied["all_tied_weights_keys"] is not None:
            self.model.all_tied_weights_keys = self._untied["all_tied_weights_keys"]
        self._untied = None


@dataclass
class KeepOriginals(Edit):
    """Keeps a CPU copy of tensors another edit or training may change, and puts them back.

    ``revert(merge=False)`` restores every tensor bit-exactly (a failed patch, or ``unpatch(merge=False)``);
    ``revert(merge=True)`` restores only ``frozen`` ones (those nothing trains, e.g. the embeddings), so the
    exact values come back where rotating back would round.
    """

    tensors: list[tuple[str, Tensor]]
    frozen: set[str] = field(default_factory=set)
    _copies: list[Tensor] | None = None

    def apply(self, model: nn.Module) -> None:
        self._copies = [t.detach().to("cpu", copy=True) for _, t in self.tensors]

    def revert(self, model: nn.Module, merge: bool) -> None:
        if self._copies is None:
            return
        with torch.no_grad():
            for (label, tensor), copy in zip(self.tensors, self._copies):
                if not merge or label in self.frozen:
                    tensor.copy_(copy.to(tensor.device))
        self._copies = None
