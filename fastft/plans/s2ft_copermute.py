"""Function-preserving co-permutations of Llama-style decoder blocks (Llama, Qwen2, Mistral, Gemma).

A decoder block computes, per layer,

    attention:  q = x W_qᵀ (+b_q), k = x W_kᵀ (+b_k), v = x W_vᵀ (+b_v)    (H query heads, G key/value heads)
                out_h = softmax(rope(q_h) rope(k_{h // r})ᵀ / √d) v_{h // r}     r = H / G queries per KV head
                y = [out_0 … out_{H-1}] W_oᵀ (+b_o)
    FFN:        y = (act(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ

and both halves are sums over units (query heads; FFN channels) whose order nothing else depends on.

FFN rule. Permuting the channels — the rows of gate_proj and up_proj (and their biases) and the columns
of down_proj with one permutation — leaves the block's output unchanged: the activation is elementwise.

Attention rule (with grouped-query attention, G < H). A query head is a block of ``head_dim`` rows of
W_q; rotary embeddings act within a head, identically for every head, so only whole heads may move.
Query head h reads key/value head ``h // r`` (``repeat_kv``), so after a permutation query slot j must
still sit in the group of the key/value head now in KV slot ``j // r``. The permutations that keep the
function are therefore exactly:

  * a permutation σ of the G key/value heads, applied to the rows of W_k and W_v (and b_k, b_v), with
    the query heads moving group by group in the same order, and
  * any permutation of the r query heads *within* a group,

that is, a query order π with ``π[j] // r == σ[j // r]`` for every slot j, applied to the rows of W_q
(and b_q) and the head-blocks of columns of W_o. Reshaping W_q with the key/value head count, or
permuting query heads across groups without moving their key/value head, changes the function.
Per-head-shared parameters (q_norm / k_norm weights of shape ``head_dim``) are unaffected.

Making selected heads contiguous at the front: a set of query heads can be brought to slots
``0 .. k-1`` by such a permutation iff it fills whole groups plus at most one partial group. The
selected heads are given as a list in slot order; :func:`head_orders` checks this and completes the
orders (selected groups first, the other groups in ascending order; inside the partial group the
selected heads first, the rest ascending).

The permutation is an :class:`Edit` (``apply`` / ``revert``) that rewrites the weights *in place*
(same tensors, same storages, so views of them stay valid); it is exact (gathers, no arithmetic), and
``revert`` applies the inverse permutation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from .registry import Edit

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
HEAD_SHARED_NORMS = ("q_norm", "k_norm")


def _plain_linear(module: nn.Module, name: str, what: str) -> nn.Linear:
    layer = getattr(module, name, None)
    if not isinstance(layer, nn.Linear) or not layer.weight.is_floating_point():
        found = "nothing" if layer is None else type(layer).__name__
        raise ValueError(
            f"{what}: expected an nn.Linear with a float weight named '{name}', found {found}. "
            "S²FT co-permutes Llama-style blocks (Llama, Qwen2, Mistral, Gemma: q/k/v/o_proj and "
            "gate/up/down_proj as plain nn.Linear layers); patch the unquantized model."
        )
    return layer


def _refuse_other_parameters(module: nn.Module, allowed: Sequence[str], what: str) -> None:
    """Parameters the permutation would not move (e.g. per-head attention sinks) make it unsafe."""
    for name, _ in module.named_parameters():
        if name.split(".", 1)[0] not in allowed:
            raise ValueError(
                f"{what} has a parameter '{name}' that a head/channel permutation does not know how to move; "
                "S²FT co-permutes Llama-style blocks only."
            )


@dataclass
class AttentionBlock:
    """The four projections of one attention module, with its head geometry."""

    name: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, module: nn.Module, name: str) -> "AttentionBlock":
        what = f"attention module '{name}' ({type(module).__name__})"
        q, k, v, o = (_plain_linear(module, p, what) for p in ATTENTION_PROJECTIONS)
        _refuse_other_parameters(module, ATTENTION_PROJECTIONS + HEAD_SHARED_NORMS, what)
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"{what} has no integer head_dim attribute; cannot tell where one head ends.")
        if q.out_features % head_dim or k.out_features % head_dim:
            raise ValueError(f"{what}: q_proj ({q.out_features}) / k_proj ({k.out_features}) rows are not whole heads of {head_dim}.")
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if v.out_features != k.out_features or o.in_features != q.out_features or heads % kv_heads:
            raise ValueError(
                f"{what}: inconsistent shapes (q {q.out_features}, k {k.out_features}, v {v.out_features} rows, "
                f"o {o.in_features} columns, head_dim {head_dim})."
            )
        return cls(name, q, k, v, o, head_dim, heads, kv_heads)


@dataclass
class FFNBlock:
    """gate_proj, up_proj and down_proj of one gated FFN."""

    name: str
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @property
    def channels(self) -> int:
        return self.up.out_features

    @classmethod
    def of(cls, module: nn.Module, name: str) -> "FFNBlock":
        what = f"FFN module '{name}' ({type(module).__name__})"
        gate, up, down = (_plain_linear(module, p, what) for p in FFN_PROJECTIONS)
        _refuse_other_parameters(module, FFN_PROJECTIONS, what)
        if not gate.out_features == up.out_features == down.in_features:
            raise ValueError(
                f"{what}: gate ({gate.out_features}) and up ({up.out_features}) rows and down ({down.in_features}) "
                "columns must match."
            )
        return cls(name, gate, up, down)


# ------------------------------------------------------------------------------------------------ orders


def _check_distinct(selected: Sequence[int], total: int, what: str) -> list[int]:
    chosen = [int(i) for i in selected]
    if len(chosen) > total:
        raise ValueError(f"{len(chosen)} {what} asked, but there are only {total}.")
    bad = [i for i in chosen if not 0 <= i < total]
    if bad:
        raise ValueError(f"{what} {bad} do not exist (valid: 0..{total - 1}).")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{what} listed twice in {chosen}.")
    return chosen


def channel_order(selected: Sequence[int], total: int) -> list[int]:
    """New channel slot -> original channel: the selected channels (in the given order), then the rest."""
    chosen = _check_distinct(selected, total, "FFN channels")
    taken = set(chosen)
    return chosen + [c for c in range(total) if c not in taken]


def head_orders(selected: Sequence[int], num_heads: int, num_kv_heads: int) -> tuple[list[int], list[int]]:
    """(query order π, key/value order σ) putting ``selected`` query heads in slots 0..k-1 (module docstring).

    Raises ``ValueError`` when ``selected`` cannot be made a prefix without changing the function: each
    run of r = H/G consecutive entries must come from one key/value group, every run but the last full.
    """
    chosen = _check_distinct(selected, num_heads, "query heads")
    r = num_heads // num_kv_heads
    groups: list[int] = []
    for start in range(0, len(chosen), r):
        run = chosen[start:start + r]
        run_groups = sorted({h // r for h in run})
        if len(run_groups) != 1:
            raise ValueError(
                f"query heads {chosen} cannot be made contiguous: with {num_heads} query heads over {num_kv_heads} "
                f"key/value heads ({r} per group), heads h = {r}g..{r}g+{r - 1} share key/value head g and can only "
                f"move with it, so the selection must list whole groups in runs of {r} (the last run may be "
                f"shorter); the run {run} spans groups {run_groups}."
            )
        groups.append(run_groups[0])
    taken_groups = set(groups)
    kv_order = groups + [g for g in range(num_kv_heads) if g not in taken_groups]
    q_order = list(chosen)
    partial = groups[-1] if len(chosen) % r else None
    if partial is not None:
        listed = set(chosen)
        q_order += [h for h in range(partial * r, partial * r + r) if h not in listed]
    for g in kv_order[len(groups):]:
        q_order += list(range(g * r, g * r + r))
    return q_order, kv_order


def expand_heads(order: Sequence[int], head_dim: int) -> Tensor:
    """Head order -> the order of the rows (or columns) those heads span."""
    heads = torch.as_tensor(list(order), dtype=torch.int64)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def inverse(order: Tensor) -> Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return inv


# --------------------------------------------------------------------------------------------- the edit


def _gather_(tensor: Tensor, order: Tensor, dim: int) -> None:
    """``tensor[...] = tensor.index_select(dim, order)`` in place (same storage: views stay valid)."""
    with torch.no_grad():
        tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))


def _permute_rows_(layer: nn.Linear, order: Tensor) -> None:
    _gather_(layer.weight, order, 0)
    if layer.bias is not None:
        _gather_(layer.bias, order, 0)


def _permute_columns_(layer: nn.Linear, order: Tensor) -> None:
    _gather_(layer.weight, order, 1)


class CoPermutation(Edit):
    """An :class:`fastft.patch.Edit` permuting heads and FFN channels of decoder blocks in place.

    ``attention``: (block, query head order π, key/value head order σ) triples; ``ffn``: (block, channel
    order) pairs. An order maps new slot -> original unit.
    """

    def __init__(
        self,
        attention: Sequence[tuple[AttentionBlock, Sequence[int], Sequence[int]]] = (),
        ffn: Sequence[tuple[FFNBlock, Sequence[int]]] = (),
    ):
        self.attention = [(block, expand_heads(q, block.head_dim), expand_heads(kv, block.head_dim))
                          for block, q, kv in attention]
        self.ffn = [(block, torch.as_tensor(list(order), dtype=torch.int64)) for block, order in ffn]
        self.applied = False

    def _permute(self, invert: bool) -> None:
        pick = inverse if invert else (lambda order: order)
        for block, q_rows, kv_rows in self.attention:
            q_rows, kv_rows = pick(q_rows), pick(kv_rows)
            _permute_rows_(block.q, q_rows)
            _permute_rows_(block.k, kv_rows)
            _permute_rows_(block.v, kv_rows)
            _permute_columns_(block.o, q_rows)
        for block, order in self.ffn:
            order = pick(order)
            _permute_rows_(block.gate, order)
            _permute_rows_(block.up, order)
            _permute_columns_(block.down, order)

    def apply(self, model: nn.Module) -> None:
        if self.applied:
            return
        self._permute(invert=False)
        self.applied = True

    def revert(self, model: nn.Module, merge: bool) -> None:
        """Undo the permutation (the weights keep whatever was trained into them)."""
        if not self.applied:
            return
        self._permute(invert=True)
        self.applied = False
