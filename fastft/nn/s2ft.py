"""``S2FTLinear``: a drop-in for ``nn.Linear`` that trains one contiguous slice of its weight.

    y = x Wᵀ + b,     trainable: W[:, :S] (``rows=False``, input columns) or W[:S, :] (``rows=True``)

The slice is its own ``nn.Parameter``, ``weight_slice``, which is a *view of the frozen weight's
storage*: the forward stays one dense GEMM over W with no copy or concatenation, and an optimizer
updating ``weight_slice`` in place updates W. Optimizers keep state for the slice only, and the op
(``fastft.ops.s2ft_linear``) produces the slice's gradient only (no full-size weight gradient), saving
``x[..., :S]`` (columns) or ``x`` (rows) for it. The base layer is kept, untouched apart from its
trained slice, as the child ``base_layer``; its weight and bias stay frozen.

In a model, ``fastft.patch`` with a :class:`fastft.S2FTConfig` first co-permutes each decoder block so
that the selected heads/channels come first (``fastft.plans.s2ft_copermute``); the slice is then always the first
S columns or rows. ``index`` records, for each position of the slice, the column (or row) of the
*original, unpermuted* weight it came from; ``fastft.save`` stores it with the slice.

Keeping the view intact: moving or casting the module (``.to``, ``.cuda``, ``.half``) re-points
``weight_slice`` at the new weight, and the forward re-points it (copying the slice's values into W
first) if anything else separated them, e.g. ``copy.deepcopy``. ``state_dict()`` holds the trained values
once, inside ``base_layer.weight``; ``weight_slice`` is not a separate entry (no shared storage on disk).
``weight_slice`` carries the attribute ``fastft_view_of_frozen = True`` so parameter counts in the
patch report count its entries once.

Being part of the weight, the slice has the weight's dtype: with bfloat16 weights the optimizer updates
it in bfloat16, as full fine-tuning of those entries would. For float32 master weights keep the model
in float32 and train under autocast (the op then computes in the autocast dtype).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from ..bnb import is_linear4bit
from ..distributed import is_fsdp_managed
from ..ops.s2ft_linear import s2ft_linear
from .layer import FastFTLayer, WrapsLinear


def _check_base(layer: nn.Module) -> None:
    if is_linear4bit(layer):
        raise TypeError(
            "fastft S²FT trains a slice of a float weight in place; a bitsandbytes Linear4bit cannot hold one. "
            "Patch the unquantized model, or use fastft.LoRAConfig for a 4-bit base (QLoRA)."
        )
    if not isinstance(layer, nn.Linear) or not layer.weight.is_floating_point():
        what = type(layer).__name__
        if isinstance(layer, nn.Linear):
            what += f" with a {layer.weight.dtype} weight"
        raise TypeError(f"fastft S²FT patches nn.Linear layers with float weights; got {what}.")


class S2FTLinear(WrapsLinear, FastFTLayer):
    """Trains ``W[:, :width]`` (or ``W[:width, :]`` with ``rows=True``) of a frozen ``nn.Linear``.

    Args:
        base_layer: the ``nn.Linear`` (float weight) to wrap; kept as the child ``base_layer``.
        width: S, the number of leading input columns (or output rows) that train; 1 <= S <= in (out).
        rows: train output rows instead of input columns.
        index: for each slice position, the row/column of the original (unpermuted) weight it holds;
            default ``range(width)``. Recorded for saving and reporting.
        label: a short description for the patch report (e.g. "2 heads").
        defer_attach: leave the snapshot of the initial slice to :meth:`attach` (``fastft.patch`` calls it
            once every module is validated).
    """

    op = "s2ft_linear"
    kind = "s2ft"

    def __init__(
        self,
        base_layer: nn.Module,
        width: int,
        rows: bool = False,
        index: Optional[Sequence[int] | Tensor] = None,
        label: str = "",
        defer_attach: bool = False,
    ):
        super().__init__()
        _check_base(base_layer)
        limit = base_layer.out_features if rows else base_layer.in_features
        what = "output rows" if rows else "input columns"
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= limit:
            raise ValueError(
                f"S2FTLinear: width={width!r} {what} asked, but the layer has {limit} "
                f"({base_layer.in_features}->{base_layer.out_features}); use 1 <= width <= {limit}."
            )
        index = torch.arange(width) if index is None else torch.as_tensor(index, dtype=torch.int64).cpu()
        if index.shape != (width,) or (index < 0).any() or (index >= limit).any() or index.unique().numel() != width:
            raise ValueError(f"S2FTLinear: index must hold {width} distinct {what} in [0, {limit}), got {index.tolist()}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.width = width
        self.rows = rows
        self.index = index
        self.label = label
        self.weight_slice = nn.Parameter(self._slice_view(), requires_grad=True)
        self.weight_slice.fastft_view_of_frozen = True
        self.initial_slice: Optional[Tensor] = None
        self.attached = False
        if not defer_attach:
            self.attach()

    @classmethod
    def from_linear(cls, layer: nn.Module, width: int, rows: bool = False, index=None) -> "S2FTLinear":
        """Wrap ``layer``, training its first ``width`` input columns (or output rows with ``rows=True``)."""
        return cls(layer, width, rows=rows, index=index)

    # What model code reads of the layer it replaced: the wrapped layer's parameters, read-only (no setter).
    # ----------------------------------------------------------------- the view
    def _slice_view(self) -> Tensor:
        weight = self.base_layer.weight.detach()
        return weight[: self.width] if self.rows else weight[:, : self.width]

    def _is_linked(self) -> bool:
        view, param = self._slice_view(), self.weight_slice
        return (
            param.device == view.device
            and param.dtype == view.dtype
            and param.data_ptr() == view.data_ptr()
            and param.stride() == view.stride()
        )

    def relink(self) -> None:
        """Make ``weight_slice`` a view of the weight again, the slice's values winning (no-op if it is one)."""
        if self._is_linked():
            return
        with torch.no_grad():
            view = self._slice_view()
            view.copy_(self.weight_slice.detach().to(view.device, view.dtype))
            self.weight_slice.data = view

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        # .to() / .half() / .cuda() convert the weight and the slice separately: point the slice back.
        with torch.no_grad():
            self.weight_slice.data = self._slice_view()
        if self.initial_slice is not None:
            self.initial_slice = fn(self.initial_slice)
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # the slice lives in base_layer.weight, which the child saves

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        pass  # loading base_layer.weight (in place) loads the slice with it

    # ---------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        """Remember the slice as it is now, so ``unpatched(merge=False)`` can drop the training."""
        self.attached = True
        self.snapshot()

    def snapshot(self) -> None:
        self.initial_slice = self._slice_view().clone()

    def restore_initial(self) -> None:
        """Write the remembered initial slice back into the weight (and forget it)."""
        if self.initial_slice is not None:
            with torch.no_grad():
                self._slice_view().copy_(self.initial_slice)
            self.initial_slice = None

    def unpatched(self, merge: bool) -> nn.Module:
        """The plain layer: with the trained slice in its weight (``merge``) or the initial slice restored.

        The trained values already live in the weight, so merging copies nothing.
        """
        self.relink()
        if not merge:
            self.restore_initial()
        return self.base_layer

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension is {x.shape[-1]} but this layer takes "
                f"{self.in_features} features (input shape {tuple(x.shape)})."
            )
        if is_fsdp_managed(self):
            raise RuntimeError(
                "fastft S²FT under FSDP: the trained slice is a view of the frozen weight, and FSDP shards and "
                "gathers the two as separate tensors, so the slice's updates would not reach the weight. Train "
                "S²FT with DDP (or on one process), or use LoRA with FSDP."
            )
        # a traced graph keeps the view it was traced with; a fake slice (shapes only, e.g. while
        # fastft.select_trainable reads the graph) has no storage to link
        if not torch.compiler.is_compiling() and not isinstance(self.weight_slice, FakeTensor):
            self.relink()
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = self.base_layer.weight.to(dtype)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(dtype)
        return s2ft_linear(x.to(dtype), weight, bias, self.weight_slice.to(dtype), self.rows)

    # ----------------------------------------------------------------- adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight_slice": self.weight_slice}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trained slice and, for each of its positions, the row/column of the original weight."""
        self.relink()
        return {"weight_slice": self.weight_slice.detach().clone(), "index": self.index.clone()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"weight_slice", "index"}:
            raise ValueError(f"S²FT state has keys {sorted(state)}, expected ['index', 'weight_slice']")
        saved_index = state["index"].to("cpu", torch.int64)
        if not torch.equal(saved_index, self.index):
            raise ValueError(
                f"the saved slice holds original {'rows' if self.rows else 'columns'} {saved_index.tolist()[:8]}... "
                f"but this module trains {self.index.tolist()[:8]}...: the selection differs."
            )
        if state["weight_slice"].shape != self.weight_slice.shape:
            raise ValueError(
                f"weight_slice: saved shape {tuple(state['weight_slice'].shape)} != {tuple(self.weight_slice.shape)}"
            )
        self.relink()
        with torch.no_grad():
            self.weight_slice.copy_(state["weight_slice"])

    def report_detail(self) -> str:
        what = "rows" if self.rows else "cols"
        total = self.out_features if self.rows else self.in_features
        detail = f"{what} [0, {self.width}) of {total}"
        return f"{detail}: {self.label}" if self.label else detail

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"trains={'rows' if self.rows else 'columns'} [0, {self.width})"
        )
