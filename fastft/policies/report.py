"""``SelectionReport``: what ``fastft.select_trainable`` chose, tensor by tensor, and its backward FLOPs."""
from __future__ import annotations

from dataclasses import dataclass, field


def format_flops(n: int) -> str:
    """``n`` FLOPs with a decimal suffix (k, M, G, T)."""
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return str(int(n))


@dataclass
class SelectedTensor:
    """One candidate parameter.

    ``dw_flops``: FLOPs of the products only this tensor needs (its weight gradient).
    ``alone_flops``: backward FLOPs if it were the only tensor trained (its weight gradient plus the
    activation gradients from the loss down to it).
    ``importance``: GreenTrainer's ``-Σ g ⊙ Δw`` from the probe step (policy ``"flops"`` only).
    """

    name: str
    shape: tuple[int, ...]
    params: int
    trainable: bool
    layer: int | None
    dw_flops: int
    alone_flops: int
    importance: float | None = None


@dataclass
class SelectionReport:
    """What :func:`fastft.select_trainable` did.

    ``tensors`` lists every candidate (the parameters that required grad before the call) with its choice.
    ``backward_flops`` is the backward of one training step with this choice, ``full_backward_flops`` the
    backward with every candidate trainable (on a plain model: full fine-tuning), both for the token shape
    ``tokens``, counted as ``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products and
    attention, 2 per multiply-add), without the forward recomputation gradient checkpointing adds.
    ``cut``: the module whose input enters detached (nothing below it is backpropagated), or None.
    ``budget_flops``: the FLOPs the ``"flops"`` policy had to stay within.
    """

    model: str
    policy: str
    arguments: dict
    tokens: tuple[int, ...]
    tensors: list[SelectedTensor]
    trainable_params: int
    total_params: int
    backward_flops: int
    full_backward_flops: int
    cut: str | None
    checkpointing: str
    budget_flops: int | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    @property
    def trainable(self) -> list[str]:
        """Names of the parameters that train."""
        return [t.name for t in self.tensors if t.trainable]

    @property
    def frozen(self) -> list[str]:
        """Names of the candidates this selection froze."""
        return [t.name for t in self.tensors if not t.trainable]

    @property
    def flops_ratio(self) -> float:
        """``backward_flops / full_backward_flops``."""
        return self.backward_flops / max(self.full_backward_flops, 1)

    def __str__(self) -> str:
        show_importance = any(t.importance is not None for t in self.tensors)
        header = ["tensor", "layer", "shape", "params", "trains", "dW FLOPs", "alone FLOPs"]
        if show_importance:
            header.append("importance")
        rows = []
        for t in self.tensors:
            row = [t.name, "-" if t.layer is None else str(t.layer), "x".join(map(str, t.shape)) or "scalar",
                   f"{t.params:,}", "yes" if t.trainable else "no", format_flops(t.dw_flops),
                   format_flops(t.alone_flops)]
            if show_importance:
                row.append("-" if t.importance is None else f"{t.importance:.3e}")
            rows.append(row)
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        args = ", ".join(f"{k}={v}" for k, v in self.arguments.items())
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        out = [
            f"fastft selection report: {self.model}, policy {self.policy!r} ({args}), tokens {self.tokens}",
            line(header),
            line(["-" * w for w in widths]),
            *(line(r) for r in rows),
            "",
            f"trains {len(self.trainable)} of {len(self.tensors)} candidate tensors; "
            f"trainable params: {self.trainable_params:,} / {self.total_params:,} ({share:.4f}%)",
            f"backward FLOPs: {self.backward_flops:,} of {self.full_backward_flops:,} with every candidate "
            f"trainable ({100 * self.flops_ratio:.2f}%)"
            + ("" if self.budget_flops is None else f"; budget {self.budget_flops:,}"),
            (f"backward stops at the input of {self.cut} (detached)" if self.cut else
             "backward reaches the bottom of the model (a trainable tensor lies below the decoder layers)")
            + f"; gradient checkpointing: {self.checkpointing}",
        ]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def _repr_pretty_(self, printer, cycle):  # IPython
        printer.text(str(self))
