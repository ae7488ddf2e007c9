"""What a policy sees: the candidate parameters, the decoder layers, and the backward cost of any choice."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..targets import LayerStack
from .cost import CostModel
from .cut import checkpointing_of
from .knapsack import SelectionProblem


@dataclass
class Choice:
    """A policy's answer: indices into ``Context.candidates`` that train, and what it wants reported."""

    selected: list[int]
    importance: list[float] | None = None
    budget_flops: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    """The model as a policy sees it.

    ``candidates``: the parameters that required grad when ``select_trainable`` was called, in model order.
    ``layer_of[j]``: the decoder layer holding candidate j, or None (embeddings, final norm, lm_head).
    """

    model: nn.Module
    candidates: list[tuple[str, nn.Parameter]]
    stack: LayerStack | None
    layer_of: list[int | None]
    cost: CostModel
    budget: float | None
    seed: int
    options: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return 0 if self.stack is None else len(self.stack.blocks)

    def checkpointing(self, layer: int) -> str:
        return checkpointing_of(self.stack.blocks[layer])

    # ------------------------------------------------------------------ where the backward stops
    def lowest(self, chosen) -> int | None:
        """The chosen candidate used first in the forward (the deepest one the backward must reach)."""
        reached = [j for j in chosen if self.cost.leaves[j].position >= 0]
        return min(reached, key=lambda j: self.cost.leaves[j].position) if reached else None

    def _stack_top(self) -> int:
        """Highest position of a leaf inside the decoder layers (their pseudo inputs included)."""
        top = -1
        for j, leaf in enumerate(self.cost.leaves):
            inside = leaf.kind == "pseudo" or (j < self.cost.n_params and self.layer_of[j] is not None)
            if inside:
                top = max(top, leaf.position)
        return top

    def cut_for(self, lowest: int | None) -> tuple[str, Any] | None:
        """Where the backward is cut when ``lowest`` is the deepest candidate chosen.

        ``("layer", i)``: the input of decoder layer i; ``("module", name)``: the input of the module owning
        a parameter above the decoder layers (final norm, lm_head); None: nothing to cut (the deepest
        candidate lies below the decoder layers, e.g. the embedding).
        """
        if lowest is None:
            return None
        if self.layer_of[lowest] is not None:
            return ("layer", self.layer_of[lowest])
        if self.stack is not None and self.cost.leaves[lowest].position > self._stack_top():
            return ("module", self.candidates[lowest][0].rpartition(".")[0])
        return None

    def cut_name(self, cut) -> str | None:
        if cut is None:
            return None
        if cut[0] == "layer":
            return f"{self.stack.prefix}.{cut[1]}"
        return cut[1]

    def companions(self, lowest: int | None) -> int:
        """Leaves that require grad besides the chosen ones: the cut layer's input under reentrant
        checkpointing, or, with no cut, the external leaves (e.g. an embedding output made to require grad)."""
        cut = self.cut_for(lowest)
        if cut is None:
            return self.cost.external_mask() if lowest is not None else 0
        if cut[0] == "layer" and self.checkpointing(cut[1]) == "reentrant" and cut[1] in self.cost.pseudo_of_layer:
            return 1 << self.cost.pseudo_of_layer[cut[1]]
        return 0

    def backward_flops(self, chosen) -> int:
        """Exact backward FLOPs of one step training exactly ``chosen`` (candidate indices)."""
        chosen = list(chosen)
        mask = 0
        for j in chosen:
            mask |= 1 << j
        return self.cost.flops(mask | self.companions(self.lowest(chosen)))

    def all_candidates(self) -> list[int]:
        return list(range(len(self.candidates)))

    # ------------------------------------------------------------------ GreenTrainer's problem
    def selection_problem(self, values: list[float], capacity: int) -> tuple[SelectionProblem, list[int], bool]:
        """The knapsack of :mod:`fastft.policies.knapsack` over the reachable candidates.

        Returns the problem, the candidate index of each of its items, and whether its cost equals the
        exact backward FLOPs for every subset (True for Llama-style models with or without LoRA; otherwise
        it is an upper bound, so the budget still holds).
        """
        leaves = self.cost.leaves
        order = sorted((leaf.position, i) for i, leaf in enumerate(leaves) if leaf.position >= 0)
        by_position = [i for _, i in order]
        position = {i: p for p, i in order}
        reachable = [j for j in self.all_candidates() if leaves[j].position >= 0]
        local = {j: k for k, j in enumerate(reachable)}
        weights = [0] * len(reachable)
        conds: list[list[tuple[int, int]]] = [[] for _ in reachable]
        shared: list[tuple[int, int]] = []
        exact = True
        for item in self.cost.items:
            t = -1
            while t + 1 < len(by_position) and item.reach >> by_position[t + 1] & 1:
                t += 1
            rest = [i for i in range(len(leaves)) if item.reach >> i & 1 and (i not in position or position[i] > t)]
            params = [i for i in rest if i < self.cost.n_params and i in local]
            others = [i for i in rest if i not in params]
            if not rest:
                shared.append((item.flops, t))
            elif others or len(params) > 1:
                exact = False  # charge it whenever the backward reaches the highest of them
                shared.append((item.flops, max(position.get(i, -1) for i in rest)))
            elif t < 0:
                weights[local[params[0]]] += item.flops
            else:
                conds[local[params[0]]].append((item.flops, t))
        groups = []
        for j in reachable:
            extra = self.companions(j)
            depth = position[j]
            for i in range(len(leaves)):
                if extra >> i & 1 and i in position:
                    depth = min(depth, position[i])
            groups.append(depth)
        problem = SelectionProblem([values[j] for j in reachable], weights, groups, capacity, conds, shared)
        return problem, reachable, exact
