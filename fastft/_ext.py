"""fastft's C libraries (``csrc/``) called on torch tensors, through ctypes.

``fastft/build.py`` builds and loads the libraries; this module declares their entry points (mirroring
``csrc/fastft.h``), keeps one loaded copy of each per process, and turns tensors into pointers, shapes
and strides. The op files (``fastft/ops/hadamard.py``, ``fake_quantize.py``, ``dequantize_4bit.py``) call
the functions at the bottom when ``fastft/dispatch.py`` picks the ``cpp`` or ``cuda`` backend.

Availability. :func:`available` loads a library the first time it is asked (building it if needed, a few
seconds for the CPU library) and remembers the outcome for the process. If the CPU library cannot be
built (no compiler, no ninja, a compiler error) it warns ONCE and the dispatcher runs the PyTorch
reference on CPU; a backend forced with ``FASTFT_BACKEND`` that cannot run is an error there.

Inputs. The kernels read rows of the last dimension with a row stride: an input whose last dimension is
contiguous and whose leading dimensions flatten to one stride (e.g. a slice ``x[:, :d]``, an expanded
row) is passed as it is; any other layout (a transposed matrix ...) is copied to a contiguous tensor
first. Outputs and masks are always new contiguous tensors.

Errors from the libraries come back as ``RuntimeError("fastft <kind> library: <message>")`` — on a
machine without a GPU the CUDA library loads, and its entry points answer "no CUDA device".
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import build
from .math.hadamard import hadamard_factorization, hadamard_k_factor
from .math.quantization import SCALE_EPS

__all__ = [
    "RowsArgs",
    "available",
    "dequantize_4bit",
    "fake_quantize",
    "fake_quantize_backward",
    "hadamard_transform",
    "library",
    "minmax",
    "rows",
    "unavailable_reason",
]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


class RowsArgs(ctypes.Structure):
    """``fastft_rows_args`` of csrc/fastft.h, field for field."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("x_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
        ("rows", ctypes.c_int64), ("d", ctypes.c_int64),
        ("x_dtype", ctypes.c_int32), ("out_dtype", ctypes.c_int32),
        ("rotate", ctypes.c_int32), ("k", ctypes.c_int32), ("hk", ctypes.c_void_p), ("row_scale", ctypes.c_double),
        ("keep_in", ctypes.c_void_p),
        ("quant", ctypes.c_int32), ("bits", ctypes.c_int32), ("symmetric", ctypes.c_int32), ("pad0", ctypes.c_int32),
        ("clip_ratio", ctypes.c_double), ("scale_eps", ctypes.c_double), ("group_size", ctypes.c_int64),
        ("stats", ctypes.c_void_p), ("keep_out", ctypes.c_void_p),
    ]


class Dequantize4bitArgs(ctypes.Structure):
    """``fastft_dequantize_4bit_args`` of csrc/fastft.h, field for field."""

    _fields_ = [
        ("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("absmax_codes", ctypes.c_void_p),
        ("code2", ctypes.c_void_p), ("absmax2", ctypes.c_void_p), ("code", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("n", ctypes.c_int64), ("blocksize", ctypes.c_int64), ("blocksize2", ctypes.c_int64),
        ("offset", ctypes.c_float), ("out_dtype", ctypes.c_int32),
    ]


_SIGNATURES = {
    "cpu": {
        "last_error": ([], ctypes.c_char_p),
        "args_size": ([], ctypes.c_int),
        "max_threads": ([], ctypes.c_int),
        "supports_dtype": ([ctypes.c_int], ctypes.c_int),
        "rows": ([ctypes.POINTER(RowsArgs), ctypes.c_int], ctypes.c_int),
        "minmax": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                    ctypes.POINTER(ctypes.c_double), ctypes.c_int], ctypes.c_int),
    },
    "cuda": {
        "last_error": ([], ctypes.c_char_p),
        "args_size": ([], ctypes.c_int),
        "device_count": ([], ctypes.c_int),
        "max_row": ([ctypes.c_int32], ctypes.c_int64),
        "rows": ([ctypes.POINTER(RowsArgs), ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "dequantize_4bit": ([ctypes.POINTER(Dequantize4bitArgs), ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    },
}


class _Library:
    """One C library, loaded at most once per process (the outcome, success or failure, is kept)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.lock = threading.Lock()
        self.functions: Optional[dict] = None
        self.built: Optional[build.Built] = None
        self.error: Optional[str] = None
        self.warned = False

    def load(self) -> None:
        with self.lock:
            if self.functions is not None or self.error is not None:
                return
            try:
                lib, built = build.load(self.kind)
                functions = {}
                for name, (argtypes, restype) in _SIGNATURES[self.kind].items():
                    fn = getattr(lib, f"fastft_{self.kind}_{name}")
                    fn.argtypes, fn.restype = argtypes, restype
                    functions[name] = fn
                if functions["args_size"]() != ctypes.sizeof(RowsArgs):
                    raise build.BuildError(
                        f"{built.path}: fastft_rows_args is {functions['args_size']()} bytes in C and "
                        f"{ctypes.sizeof(RowsArgs)} in fastft/_ext.py: bump ABI_VERSION when the C struct changes"
                    )
                self.functions, self.built = functions, built
            except build.BuildError as error:
                self.error = str(error)

    def reset(self) -> None:
        with self.lock:
            self.functions = self.built = self.error = None
            self.warned = False


_LIBRARIES = {kind: _Library(kind) for kind in build.LIBRARIES}


def available(kind: str) -> bool:
    """Whether library ``kind`` ("cpu" / "cuda") is loaded, building it on the first call.

    A CPU library that cannot be built warns once per process (the reference then runs on CPU).
    """
    entry = _LIBRARIES[kind]
    entry.load()
    if entry.error is not None and kind == "cpu" and not entry.warned:
        entry.warned = True
        warnings.warn(
            f"fastft: the C++ CPU kernels are unavailable, so the PyTorch reference runs fastft's ops on CPU "
            f"(slower). Reason: {entry.error}\n`python -m fastft.build` retries the build and shows it; "
            "FASTFT_BACKEND=torch skips it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return entry.functions is not None


def unavailable_reason(kind: str) -> Optional[str]:
    """Why library ``kind`` could not be loaded (None if it is loaded or was never asked for)."""
    return _LIBRARIES[kind].error


def library(kind: str) -> dict:
    """The entry points of library ``kind`` by name; RuntimeError naming the reason if it is unavailable."""
    entry = _LIBRARIES[kind]
    entry.load()
    if entry.functions is None:
        raise RuntimeError(f"the fastft {build.LIBRARIES[kind].title} is unavailable: {entry.error}")
    return entry.functions


def built(kind: str) -> Optional[build.Built]:
    """How the loaded library ``kind`` was built (None if not loaded)."""
    return _LIBRARIES[kind].built


def reset() -> None:
    """Forget the loaded libraries and failures (tests change the environment between loads)."""
    for entry in _LIBRARIES.values():
        entry.reset()


def cpu_supports(dtype: torch.dtype) -> bool:
    return dtype in DTYPE_CODES and bool(library("cpu")["supports_dtype"](DTYPE_CODES[dtype]))


def cuda_max_row(dtype: torch.dtype) -> int:
    return int(library("cuda")["max_row"](DTYPE_CODES[torch.float64 if dtype == torch.float64 else torch.float32]))


def _check(kind: str, status: int) -> None:
    if status != 0:
        message = (library(kind)["last_error"]() or b"").decode(errors="replace")
        raise RuntimeError(f"fastft {kind} library: {message}")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------- tensors -> rows
def as_rows(x: Tensor) -> tuple[Tensor, int]:
    """(x as rows × d, its row stride in elements), copying x only when no row-strided view exists."""
    d = x.shape[-1]
    view = None
    if x.dim() == 1:
        view = x.unsqueeze(0)
    else:
        try:
            view = x.view(-1, d)
        except RuntimeError:  # leading dimensions that do not flatten to one stride
            view = None
    if view is None or (d > 1 and view.stride(-1) != 1):
        view = x.reshape(-1, d).contiguous()
    stride = view.stride(0) if view.shape[0] > 1 else d
    return view, stride


@functools.lru_cache(maxsize=64)
def _k_factor(K: int, inverse: bool, device: torch.device) -> Tensor:
    """H_K (or H_Kᵀ for the inverse), ±1 as int8, row-major on ``device``."""
    H = hadamard_k_factor(K, torch.float32)
    return (H.t() if inverse else H).to(torch.int8).contiguous().to(device)


def _mask_ptr(mask: Optional[Tensor], x_rows: int, d: int) -> Optional[int]:
    if mask is None:
        return None
    if mask.dtype != torch.bool or not mask.is_contiguous() or mask.numel() != x_rows * d:
        raise ValueError(f"fastft: a mask must be a contiguous bool tensor of {x_rows}×{d} elements, got "
                         f"{mask.dtype} {tuple(mask.shape)} (contiguous={mask.is_contiguous()})")
    return mask.data_ptr()


def rows(
    x: Tensor, out: Tensor, *, rotate: bool = False, inverse: bool = False, keep_in: Optional[Tensor] = None,
    quant: Optional[dict] = None, group_size: int = 0, stats: Optional[tuple[float, float]] = None,
    keep_out: Optional[Tensor] = None,
) -> None:
    """Run the row pipeline of ``fastft_rows_args`` (csrc/fastft.h) from ``x`` into the contiguous ``out``.

    rotate/inverse: the Hadamard transform of fastft.ops.hadamard. quant: dict(bits, symmetric, clip_ratio)
    for the fake quantization of fastft.ops.fake_quantize, per group of ``group_size`` (0: per row) or
    with the tensor-wide ``stats`` (max, min). keep_in / keep_out: bool masks of x's shape.
    """
    kind = "cuda" if x.device.type == "cuda" else "cpu"
    if x.dtype not in DTYPE_CODES or out.dtype not in DTYPE_CODES:
        raise TypeError(f"fastft C kernels take float32/bfloat16/float16/float64 tensors, got {x.dtype} -> {out.dtype}")
    d = x.shape[-1]
    view, row_stride = as_rows(x)
    n_rows = view.shape[0]
    if not out.is_contiguous() or out.numel() != x.numel() or out.device != x.device:
        raise ValueError("fastft: the output must be a contiguous tensor of x's size on x's device")
    args = RowsArgs()
    args.x, args.out = view.data_ptr(), out.data_ptr()
    args.x_row_stride, args.out_row_stride = row_stride, d
    args.rows, args.d = n_rows, d
    args.x_dtype, args.out_dtype = DTYPE_CODES[x.dtype], DTYPE_CODES[out.dtype]
    hk = None
    if rotate:
        K, _ = hadamard_factorization(d)
        args.rotate, args.k, args.row_scale = 1, K, 1.0 / math.sqrt(d)
        if K > 1:
            hk = _k_factor(K, bool(inverse), x.device)
            args.hk = hk.data_ptr()
    args.keep_in = _mask_ptr(keep_in, n_rows, d)
    stats_array = None
    if quant is not None:
        args.quant, args.bits, args.symmetric = 1, int(quant["bits"]), int(bool(quant["symmetric"]))
        args.clip_ratio, args.scale_eps, args.group_size = float(quant["clip_ratio"]), SCALE_EPS, int(group_size)
        if stats is not None:
            stats_array = (ctypes.c_double * 2)(float(stats[0]), float(stats[1]))
            args.stats = ctypes.cast(stats_array, ctypes.c_void_p)
        args.keep_out = _mask_ptr(keep_out, n_rows, d)
    if n_rows == 0:
        return
    fns = library(kind)
    if kind == "cuda":
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _check(kind, fns["rows"](ctypes.byref(args), x.device.index or 0, ctypes.c_void_p(stream)))
    else:
        _check(kind, fns["rows"](ctypes.byref(args), torch.get_num_threads()))
    del hk, stats_array, view  # alive until the call returned


def minmax(x: Tensor) -> tuple[float, float]:
    """(max, min) of all of x (NaN if x holds a NaN), on the CPU library."""
    view, row_stride = as_rows(x)
    result = (ctypes.c_double * 2)()
    status = library("cpu")["minmax"](view.data_ptr(), DTYPE_CODES[x.dtype], row_stride, view.shape[0], x.shape[-1],
                                      result, torch.get_num_threads())
    _check("cpu", status)
    return result[0], result[1]


# --------------------------------------------------------------------------- the ops' C backends
def hadamard_transform(x: Tensor, inverse: bool) -> Tensor:
    """The op ``fastft::hadamard_transform`` on the C libraries: x H_dᵀ (x H_d if inverse) in x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows(x, out, rotate=True, inverse=inverse)
    return out


def fake_quantize(
    x: Tensor, bits: int, granularity: str, group_size: int, symmetric: bool, clip_ratio: float, rotate: bool,
    need_mask: bool,
) -> tuple[Tensor, Tensor]:
    """The op ``fastft::fake_quantize`` on the C libraries: (out, mask) as the reference returns them."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = torch.empty(x.shape if need_mask else (0,), dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return out, mask
    quant = dict(bits=bits, symmetric=symmetric, clip_ratio=clip_ratio)
    keep = mask if need_mask else None
    if granularity == "tensor":
        source = x
        if rotate:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            source = torch.empty(x.shape, dtype=compute, device=x.device)
            rows(x, source, rotate=True)
        rows(source, out, quant=quant, stats=minmax(source), keep_out=keep)
    else:
        rows(x, out, rotate=rotate, quant=quant, group_size=group_size if granularity == "group" else 0,
             keep_out=keep)
    return out, mask


def fake_quantize_backward(grad: Tensor, mask: Tensor, rotate: bool) -> Tensor:
    """The op ``fastft::fake_quantize_backward`` on the C libraries: STE mask, then the inverse rotation."""
    if not rotate and not mask.numel():
        return grad.clone()
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    rows(grad, out, rotate=rotate, inverse=True, keep_in=mask.contiguous() if mask.numel() else None)
    return out


def dequantize_4bit(
    packed: Tensor, absmax: Optional[Tensor], code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype,
    nested: Optional[tuple[Tensor, Tensor, Tensor, int, float]] = None,
) -> Tensor:
    """The dense ``shape`` weight from a packed 4-bit one on the CUDA library (fastft/ops/dequantize_4bit.py).

    ``nested``: (absmax_codes uint8, code2 float32, absmax2 float32, blocksize2, offset) instead of absmax.
    """
    n = shape[0] * shape[1]
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    args = Dequantize4bitArgs()
    keep = [packed.reshape(-1).contiguous().view(torch.uint8), code.float().contiguous()]
    args.packed, args.code = keep[0].data_ptr(), keep[1].data_ptr()
    if nested is None:
        keep.append(absmax.float().contiguous())
        args.absmax = keep[-1].data_ptr()
    else:
        codes, code2, absmax2, blocksize2, offset = nested
        keep += [codes.reshape(-1).contiguous().view(torch.uint8), code2.float().contiguous(), absmax2.float().contiguous()]
        args.absmax_codes, args.code2, args.absmax2 = (t.data_ptr() for t in keep[-3:])
        args.blocksize2, args.offset = int(blocksize2), float(offset)
    args.out, args.n, args.blocksize, args.out_dtype = out.data_ptr(), n, int(blocksize), DTYPE_CODES[dtype]
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    _check("cuda", library("cuda")["dequantize_4bit"](ctypes.byref(args), packed.device.index or 0,
                                                      ctypes.c_void_p(stream)))
    del keep
    return out
