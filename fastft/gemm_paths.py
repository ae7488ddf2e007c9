"""GEMM paths: an entry registered as ``"<entry>@cublas"`` and ``"<entry>@triton"`` runs one of them per call.

Part of the dispatch layer (:mod:`fastft.dispatch` wraps such entries in a :class:`PathChooser` and
re-exports the public names). ``FASTFT_GEMM=cublas`` or ``FASTFT_GEMM=triton`` forces a path; ``auto``
(the default) takes cuBLAS unless a one-time on-device measurement (``triton.testing.do_bench`` of both,
per op, entry, shape bucket, dtype and device) found the fused kernel faster. Measurements are cached in
the process and, when ``FASTFT_GEMM_CACHE`` names a JSON file (``FASTFT_GEMM_CACHE=1``: ``<fastft cache
dir>/gemm_paths.json``), on disk. Off a GPU nothing is measured: ``auto`` runs the fused kernel.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Mapping, Optional

import torch

from .build import cache_root


def _environment_reader():
    """``raw(key)``: an environment variable's raw value, or None; ``os.environ.get`` encodes and decodes on
    every call (microseconds a layer on the hot path), so CPython's own mapping is read where it exists."""
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and encode is not None:
        return data.get, encode
    return os.environ.get, (lambda name: name)


raw_env, encode_key = _environment_reader()
_GEMM_KEY = encode_key("FASTFT_GEMM")

GEMM_PATHS = {
    "cublas": "cuBLAS GEMM + Triton epilogue",
    "triton": "fused Triton GEMM",
}
_OP_PATH_KEYS: dict[str, dict[str, Callable[..., tuple]]] = {}
_PATH_CACHE: dict[tuple, str] = {}
_PATH_CACHE_LOADED: set[str] = set()


def register_paths(op: str, keys: Mapping[str, Callable[..., tuple]]) -> None:
    """``keys[entry](*args)``: the shape bucket of a call of ``op``'s ``entry`` (its measurement is shared by
    every call in the bucket). Entries without a key function bucket by the shapes of their tensor args."""
    _OP_PATH_KEYS[op] = dict(keys)


def gemm_mode() -> str:
    """``FASTFT_GEMM``: ``cublas``, ``triton`` or ``auto`` (default)."""
    if raw_env(_GEMM_KEY) is None:
        return "auto"
    value = os.environ.get("FASTFT_GEMM", "auto").strip().lower() or "auto"
    if value not in ("auto", *GEMM_PATHS):
        raise ValueError(f"FASTFT_GEMM={value!r}; choose cublas, triton or auto (the default), or unset it.")
    return value


def device_signature(device: torch.device) -> str:
    """What a measurement is valid for: the GPU's name and compute capability (tests replace this)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def time_call(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` takes on the GPU (median of ``triton.testing.do_bench``; tests replace this)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _cache_file() -> Optional[str]:
    value = os.environ.get("FASTFT_GEMM_CACHE", "").strip()
    if not value or value == "0":
        return None
    if value == "1":
        return str(cache_root() / "gemm_paths.json")
    return value


def _cache_load(path: str) -> None:
    if path in _PATH_CACHE_LOADED:
        return
    _PATH_CACHE_LOADED.add(path)
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return
    for row in stored if isinstance(stored, list) else []:
        if isinstance(row, list) and len(row) == 2 and row[1] in GEMM_PATHS:
            _PATH_CACHE.setdefault(_freeze(row[0]), row[1])


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _cache_store(path: str) -> None:
    rows = [[list(_thaw(k)), v] for k, v in _PATH_CACHE.items()]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            json.dump(rows, handle)
        os.replace(tmp, path)
    except OSError:
        pass  # the cache file is an optimisation; the in-process choice stands


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_path_key(*args) -> tuple:
    """Shapes of the tensor arguments, the first dimension of the first rounded up to a power of two (the
    token count: one measurement per bucket), dtypes and which optional tensors are present."""
    key: list = []
    first = True
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = list(a.shape)
            if first and shape:
                shape[0] = _bucket(shape[0])
            first = False
            key.append((tuple(shape), str(a.dtype).replace("torch.", "")))
        elif a is None:
            key.append(None)
        elif isinstance(a, bool):
            key.append(a)
    return tuple(key)


def choose_path(op: str, entry: str, device: torch.device, key: tuple,
                candidates: Mapping[str, Callable[[], object]]) -> str:
    """The path (``cublas`` or ``triton``) that runs ``op``'s ``entry`` for a call in shape bucket ``key``.

    Forced by ``FASTFT_GEMM``; else, off a GPU, ``triton`` (nothing to measure); else the cached choice, or
    both ``candidates`` timed once with :func:`time_call` and the faster kept — cuBLAS unless the fused
    kernel is faster, so the dispatch is never slower than the cuBLAS path by its own measurement.
    """
    mode = gemm_mode()
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "triton"
    full_key = (op, entry, device_signature(device), key)
    path = _PATH_CACHE.get(full_key)
    if path is not None:
        return path
    cache_file = _cache_file()
    if cache_file is not None:
        _cache_load(cache_file)
        path = _PATH_CACHE.get(full_key)
        if path is not None:
            return path
    times = {}
    for name in ("cublas", "triton"):
        try:
            times[name] = time_call(candidates[name])
        except Exception:  # a path that cannot run this call (e.g. out of resources) is not a candidate
            times[name] = float("inf")
    path = "triton" if times["triton"] < times["cublas"] else "cublas"
    _PATH_CACHE[full_key] = path
    if cache_file is not None:
        _cache_store(cache_file)
    return path


class PathChooser:
    """An entry registered in two paths: picks one per call (:func:`choose_path`) and runs it."""

    __slots__ = ("op", "entry", "paths", "key")

    def __init__(self, op: str, entry: str, cublas: Callable, triton: Callable, key: Optional[Callable]):
        self.op, self.entry, self.paths, self.key = op, entry, {"cublas": cublas, "triton": triton}, key

    def __call__(self, *args, **kwargs):
        mode = gemm_mode()
        if mode != "auto":  # forced: no key to compute
            return self.paths[mode](*args, **kwargs)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        if device.type != "cuda":
            return self.paths["triton"](*args, **kwargs)
        key = self.key(*args) if self.key is not None else default_path_key(*args)
        candidates = {name: functools.partial(fn, *args, **kwargs) for name, fn in self.paths.items()}
        return self.paths[choose_path(self.op, self.entry, device, key, candidates)](*args, **kwargs)


def path_key(op: str, entry: str) -> Optional[Callable[..., tuple]]:
    """The key function :func:`register_paths` gave ``op``'s ``entry``, or None."""
    return _OP_PATH_KEYS.get(op, {}).get(entry)


def measured_paths(op: str, device: torch.device) -> dict[str, int]:
    """How many measured shape buckets of ``op`` on ``device``'s GPU chose each path."""
    signature = device_signature(device)
    measured: dict[str, int] = {}
    for (cached_op, _entry_name, cached_signature, _key), path in _PATH_CACHE.items():
        if cached_op == op and cached_signature == signature:
            measured[path] = measured.get(path, 0) + 1
    return measured
