"""``PatchReport``: what ``fastft.patch`` did, module by module, with the backend each will run on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter represents (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as the weights they represent.

    A parameter marked ``fastft_view_of_frozen`` (an S²FT slice: a view of a frozen weight's storage)
    counts as trainable but not again in the total.
    """
    trainable = total = 0
    for param in model.parameters():
        n = logical_numel(param)
        if not getattr(param, "fastft_view_of_frozen", False):
            total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


@dataclass
class PatchedModule:
    name: str
    kind: str
    backend: str
    shape: str
    trainable: int
    detail: str = ""
    path: str = ""  # the backend with the GEMM path it takes (fastft.dispatch.path_for); shown in the table


@dataclass
class PatchReport:
    model: str
    device: str
    modules: list[PatchedModule]
    trainable_params: int
    total_params: int
    methods: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    @property
    def backends(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.modules:
            counts[row.backend] = counts.get(row.backend, 0) + 1
        return counts

    def __str__(self) -> str:
        header = ("module", "kind", "backend", "shape", "trainable", "detail")
        rows = [(m.name, m.kind, m.path or m.backend, m.shape, f"{m.trainable:,}", m.detail) for m in self.modules]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        kinds: dict[str, int] = {}
        for m in self.modules:
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        out = [
            f"fastft patch report: {self.model} on {self.device}",
            f"methods: {'; '.join(self.methods)}",
            line(header),
            line(tuple("-" * w for w in widths)),
            *(line(r) for r in rows),
            "",
            f"patched {len(self.modules)} modules ("
            + ", ".join(f"{n} {k}" for k, n in kinds.items())
            + "); backends: "
            + ", ".join(f"{b} x{n}" for b, n in self.backends.items()),
            f"trainable params: {self.trainable_params:,} / {self.total_params:,} ({share:.4f}%)",
        ]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def _repr_pretty_(self, printer, cycle):  # IPython
        printer.text(str(self))
