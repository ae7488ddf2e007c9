"""Measurement helpers shared by the demo and the benchmarks: what they count, precisely.

Every helper takes a zero-argument callable ``fn`` and runs it once (``time_interleaved`` runs several
callables many times). The quantities are chosen to carry over from this CPU-only machine to a GPU
(see DESIGN.md, "Measuring without a GPU"):

``saved_bytes(fn)`` / ``saved_tensors(fn)``
    Bytes of the tensors autograd keeps for backward while ``fn()`` runs, as seen by
    ``torch.autograd.graph.saved_tensors_hooks`` (every ``ctx.save_for_backward`` and every tensor a
    built-in backward formula saves). Each saved tensor is charged the size of its whole *untyped
    storage* (``untyped_storage().nbytes()``): that is the memory the graph keeps alive, even when it
    saved only a view. Each storage is counted once (deduplicated by ``untyped_storage().data_ptr()``).
    Not counted: ``nn.Parameter`` objects, views of a parameter (``tensor._base`` is a parameter), and
    tensors whose storage is the storage of a tensor passed in ``parameters`` (e.g. a ``.detach()``
    alias of a weight) — the model holds those anyway. Intermediates a backward creates and frees are
    not "saved" and not counted here (``peak_live_bytes`` sees them).

``peak_live_bytes(fn)``
    The peak, during ``fn()``, of the bytes held at once by tensors that ``fn`` allocated: the highest
    point of the running sum of allocations (+) and of frees (-) of those allocations, starting from
    zero when ``fn`` starts. Tensors alive before ``fn`` starts are not counted, and neither are their
    frees. On CPU the events come from ``torch.profiler`` with ``profile_memory=True``: every allocation
    and free of PyTorch's CPU allocator with its exact requested size and address, in time order, read
    from the profiler's event tree (``experimental_event_tree``, the private API PyTorch's own memory
    profiler reads; pinned by the tests). PyTorch may log a one-line warning about blocks "allocated
    before the profiling started": those are the ignored frees. On CUDA it is
    ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around ``fn`` after resetting
    the peak: the caching allocator's block sizes (rounded up to 512 bytes), where frees of older
    tensors do lower the level. Memory allocated outside PyTorch's allocator (BLAS workspaces, the
    Python heap) is not seen.

``time_interleaved`` / ``time_do_bench`` / ``Timing``
    Wall-clock timing of several providers, interleaved: :mod:`fastft.timing` (re-exported here).

``flops(fn)`` / ``flops_by_op(fn)``
    Floating-point operations counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix
    products, convolutions and the attention kernels it has formulas for, 2 per multiply-add;
    elementwise work counts 0. Four additions: the in-place forms ``addmm_`` / ``baddbmm_`` are counted
    like ``addmm`` / ``baddbmm`` (FlopCounterMode alone skips them), ``torch._grouped_mm`` (the MoE
    experts' grouped GEMM: 2 per multiply-add of the rows its offsets cover; FlopCounterMode has no formula), the CPU fused attention kernels
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward) with torch's formulas for the CUDA
    ones (FlopCounterMode alone counts them 0; causal masking is not discounted), and calls to ops outside ``aten``
    (``torch.library`` custom ops such as ``fastft::lora_linear``, opaque to FlopCounterMode) are run
    through their device kernel with the counter still active, so the aten ops inside the op's PyTorch
    implementation are counted. A Triton or C++ kernel inside such an op is opaque and counts 0: count
    FLOPs with the reference backend (``FASTFT_BACKEND=torch``), which computes the same products.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .timing import Timing, compare_timings, time_do_bench, time_interleaved, timing_from_samples  # noqa: F401

__all__ = [
    "SavedTensor",
    "Timing",
    "flops",
    "flops_by_op",
    "format_bytes",
    "peak_live_bytes",
    "live_bytes_deltas",
    "peak_of_running_sum",
    "saved_bytes",
    "saved_tensors",
    "time_do_bench",
    "compare_timings",
    "time_interleaved",
    "timing_from_samples",
]

MiB = 1024 * 1024


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable string (binary units)."""
    for unit, size in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- saved for backward
@dataclass(frozen=True)
class SavedTensor:
    """One tensor autograd saved during ``fn()``.

    ``storage_bytes`` is the size of the tensor's whole untyped storage; ``counted`` says whether
    :func:`saved_bytes` charges it, and ``reason`` why (``"counted"``, ``"parameter"``,
    ``"view of a parameter"``, ``"storage of a listed parameter"``, ``"storage already counted"``,
    ``"no storage"``).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    storage_bytes: int
    counted: bool
    reason: str


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses / tensors without storage
        return None
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr()


def _parameter_storages(parameters: nn.Module | Iterable[Any]) -> set[int]:
    """Storage pointers of the given parameters (modules contribute all their parameters and buffers)."""
    items = [parameters] if isinstance(parameters, (nn.Module, torch.Tensor)) else list(parameters)
    keys: set[int] = set()
    for item in items:
        tensors = [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]
        for tensor in tensors:
            key = _storage_key(tensor)
            if key is not None:
                keys.add(key)
    return keys


def saved_tensors(fn: Callable[[], Any], parameters: nn.Module | Iterable[Any] = ()) -> list[SavedTensor]:
    """Run ``fn()`` once and list every tensor autograd saved for backward, in the order saved.

    ``parameters``: modules or tensors whose storages are excluded besides ``nn.Parameter`` objects and
    their views (pass the model to also exclude its buffers and detached aliases of its weights).
    See the module docstring for exactly what is counted.
    """
    excluded_storages = _parameter_storages(parameters)
    seen_storages: set[int] = set()
    records: list[SavedTensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        size = 0 if key is None else tensor.untyped_storage().nbytes()
        if isinstance(tensor, nn.Parameter):
            reason = "parameter"
        elif isinstance(tensor._base, nn.Parameter):
            reason = "view of a parameter"
        elif key is None:
            reason = "no storage"
        elif key in excluded_storages:
            reason = "storage of a listed parameter"
        elif key in seen_storages:
            reason = "storage already counted"
        else:
            reason = "counted"
            seen_storages.add(key)
        records.append(SavedTensor(tuple(tensor.shape), tensor.dtype, size, reason == "counted", reason))
        # A detached alias (same storage, no grad_fn): returning the tensor itself would make an op that saves
        # its own output (exp, softmax, ...) hold its output, which holds the op: a C++ cycle that leaks the graph.
        return tensor.detach()

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # the hooks are the measurement, never part of what is measured: torch.compile must not trace them (a compiled
    # fn with graph breaks calls them from its eager parts, and dynamo would compile each new closure again)
    with torch.autograd.graph.saved_tensors_hooks(torch.compiler.disable(pack), torch.compiler.disable(unpack)):
        fn()
    return records


def saved_bytes(fn: Callable[[], Any], parameters: nn.Module | Iterable[Any] = ()) -> int:
    """Bytes of the non-parameter storages autograd saves for backward during ``fn()``, each counted once.

    ``fn`` should build the graph (run the forward) and may also run the backward; only what is
    saved is counted, so a forward-only ``fn`` gives the same number. See :func:`saved_tensors`.
    """
    return sum(record.storage_bytes for record in saved_tensors(fn, parameters) if record.counted)


# --------------------------------------------------------------------------- peak live bytes
@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 (the profiler prints banner lines from C++ when it starts and stops)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocator_events(fn: Callable[[], Any]) -> list[tuple[int, int, int]]:
    """(time ns, address, +bytes allocated / -bytes freed) of the CPU allocator's events during ``fn()``.

    Read from the profiler's event tree (allocation records carry the block's address), sorted by time.
    """
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        profiler.start()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            profiler.stop()
    events = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        fields = node.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    events.sort(key=lambda event: event[0])
    return events


def live_bytes_deltas(events: Iterable[tuple[int, int, int]]) -> list[int]:
    """The allocations, and the frees of blocks allocated among ``events`` (others' frees are dropped)."""
    live: dict[int, int] = {}
    deltas = []
    for _, address, size in events:
        if size > 0:
            live[address] = size
            deltas.append(size)
        elif address in live:
            deltas.append(-live.pop(address))
    return deltas


def peak_of_running_sum(deltas: Iterable[int]) -> int:
    """max(0, highest prefix sum of ``deltas``): the peak live bytes of an allocation/free sequence."""
    live = peak = 0
    for delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def peak_live_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak bytes of the tensors ``fn()`` allocates, live at once, on ``device``; see the module docstring."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    if device.type != "cpu":
        raise ValueError(f"peak_live_bytes measures on 'cpu' or 'cuda', not {device.type!r}")
    return peak_of_running_sum(live_bytes_deltas(_cpu_allocator_events(fn)))


# --------------------------------------------------------------------------- FLOPs
_FOREIGN_NAMESPACES_SKIPPED = ("aten", "prim", "prims")


def _addmm_inplace_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """``self.addmm_(mat1, mat2)``: 2·m·k·n, as FlopCounterMode counts ``addmm`` (the add is not counted)."""
    m, k = mat1_shape
    n = mat2_shape[1]
    return 2 * m * k * n


def _baddbmm_inplace_flops(self_shape, batch1_shape, batch2_shape, *args, out_shape=None, **kwargs) -> int:
    """``self.baddbmm_(b1, b2)``: 2·b·m·k·n, as FlopCounterMode counts ``baddbmm``."""
    b, m, k = batch1_shape
    n = batch2_shape[2]
    return 2 * b * m * k * n


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu``: torch's own SDPA formula (FlopCounterMode has it for
    the CUDA kernels only)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu_backward``: torch's own SDPA backward formula."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm_flops(mat_a, mat_b, offs=None, *args, out_val=None, **kwargs) -> int:
    """``torch._grouped_mm(a, b, offs)``: 2 multiply-adds per product of the groups' GEMMs.

    2-D a (rows×K) with 3-D b (G×K×N): each of the first ``offs[-1]`` rows is one GEMM row, 2·rows·K·N (rows
    past ``offs[-1]``, e.g. tokens routed to no expert, are not computed). 2-D a (M×Ktot) with 2-D b (Ktot×N):
    the groups split K (the weight gradient), 2·M·(offs[-1])·N. 3-D a (G×M×K) with 2-D b (K×Ntot): the groups
    split N, 2·M·K·(offs[-1]). 3-D with 3-D: a batched GEMM, 2·G·M·K·N. Without ``offs``, the whole dimension.
    """
    covered = None
    if offs is not None and not isinstance(offs, torch._subclasses.FakeTensor) and offs.numel():
        covered = int(offs[-1])
    a, b = tuple(mat_a.shape), tuple(mat_b.shape)
    if len(a) == 2 and len(b) == 3:
        rows = a[0] if covered is None else min(covered, a[0])
        return 2 * rows * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:
        depth = a[1] if covered is None else min(covered, a[1])
        return 2 * a[0] * depth * b[1]
    if len(a) == 3 and len(b) == 2:
        cols = b[1] if covered is None else min(covered, b[1])
        return 2 * a[1] * a[2] * cols
    return 2 * a[0] * a[1] * a[2] * b[2]


_grouped_mm_flops._get_raw = True  # FlopCounterMode passes the tensors themselves: the formula reads offs


def _in_place_formulas() -> dict[Any, Any]:
    """FlopCounterMode ``custom_mapping`` entries (formulas over shapes): the in-place matmuls, and the CPU
    fused attention kernels, counted with the formulas torch uses for the CUDA ones."""
    aten = torch.ops.aten
    return {
        aten.addmm_: _addmm_inplace_flops,
        aten.baddbmm_: _baddbmm_inplace_flops,
        aten._grouped_mm: _grouped_mm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }


class _RunCustomOpsThroughTheirKernels(TorchDispatchMode):
    """Runs non-aten ops by redispatching to their device kernel, so the aten ops inside stay visible.

    Entered inside a ``FlopCounterMode``: aten ops pass through to the counter; a custom op (opaque to
    the counter) is called below the Python dispatch key with this mode re-entered, so the aten ops its
    implementation calls are dispatched again and counted.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and func.namespace not in _FOREIGN_NAMESPACES_SKIPPED:
            flat = tree_leaves((args, kwargs))
            tensor = next((a for a in flat if isinstance(a, torch.Tensor)), None)
            key = None if tensor is None else getattr(torch._C.DispatchKey, tensor.device.type.upper(), None)
            if key is not None:
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


def flops_by_op(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn()`` once; FLOPs per aten op (``"aten.mm"`` ...), as counted in the module docstring."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_in_place_formulas())
    with counter, _RunCustomOpsThroughTheirKernels():
        fn()
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of ``fn()`` (forward and, if ``fn`` runs it, backward); see the module docstring."""
    return sum(flops_by_op(fn).values())
