"""The one place that decides which implementation of an op runs on which device.

Every op in ``fastft.ops`` registers its implementations per backend with :func:`register_op` and asks
:func:`implementation` (which asks :func:`backend_for`) at call time; no op file compares backend names
itself. The default is the Triton kernel on a CUDA device; on the CPU the C++ library (``cpp``) for the
ops it implements, built on first use — if it cannot be built (no compiler), one warning and the PyTorch
reference; and the PyTorch reference everywhere else. ``FASTFT_BACKEND`` overrides the choice: a backend
name, or a comma-separated preference list (``FASTFT_BACKEND=triton,torch``); :func:`use_backend` sets it
for a block. A forced backend that cannot run an op on a device (or, see ``limits``, this call of it) is
an error, never a silent fallback.

Backends:
  ``torch``   the PyTorch reference implementation: the spec of each op; runs on any device.
  ``triton``  Triton kernels from ``fastft.kernels``; runs on CUDA, and on the CPU only under the Triton
              interpreter (``TRITON_INTERPRET=1``, set before fastft is imported), which the tests use.
              Registered with :func:`lazy`: the kernel module is imported the first time it is chosen,
              which keeps Triton optional (the only function-level import of fastft code).
  ``cpp``     the C++ CPU library built from ``csrc/`` (``fastft/build.py``, ``fastft/_ext.py``); CPU tensors.
  ``cuda``    the CUDA library built from ``csrc/`` with nvcc; CUDA tensors. Chosen only when forced
              (``FASTFT_BACKEND=cuda`` or a list naming it): the default on CUDA stays ``triton``.

Paths (within a backend). An entry may come in two paths, registered as ``"<entry>@cublas"`` and
``"<entry>@triton"``: the big GEMMs by torch's matmuls (cuBLAS / cuBLASLt, with Triton only for what it fuses
better: masked skinny products, norms, in-place loss gradients) or one fused Triton GEMM kernel.
:func:`implementation` returns a callable that picks the path per call with :func:`choose_path`:
``FASTFT_GEMM=cublas`` or ``FASTFT_GEMM=triton`` forces one; ``auto`` (the default) takes cuBLAS unless a
one-time on-device measurement (``triton.testing.do_bench`` of both, per op, entry, shape bucket, dtype and
device) found the fused kernel faster. Measurements are cached in the process and, when
``FASTFT_GEMM_CACHE`` names a JSON file (``FASTFT_GEMM_CACHE=1``: ``<fastft cache dir>/gemm_paths.json``), on
disk. Off a GPU nothing is measured: ``auto`` runs the fused kernel (the interpreter tests exercise it; the
cuBLAS path runs when forced). :func:`path_for` names the path for the patch report.

Entries. An op's implementation per backend is a mapping of entry names (``"forward"``, ``"backward"``,
...) to callables with the same signature on every backend. A backend that lists no callable for an
entry runs the ``torch`` entry for it (the reference's composite of the entries the backend does
implement, e.g. a nested 4-bit dequantization that unnests, then dequantizes on the chosen backend).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from . import _ext
from .build import cache_root
from .node_costs import NodeCost, register_node_cost

KNOWN_BACKENDS = ("torch", "triton", "cpp", "cuda")

_OP_BACKENDS: dict[str, tuple[str, ...]] = {}
_OP_LIMITS: dict[str, dict[str, Callable[..., Optional[str]]]] = {}
_OP_IMPLEMENTATIONS: dict[str, dict[str, Union[Mapping[str, Callable], "lazy"]]] = {}
_COMPOSITE_OPS: set[str] = set()  # ops written in torch and other fastft ops: "torch" under any backend
_LIBRARY_DEVICE = {"cpp": "cpu", "cuda": "cuda"}  # backend -> its csrc library (named by device) and device type


class lazy:
    """Entries of a backend that live in a module imported only when the backend is first chosen.

    ``lazy("fastft.kernels.lora", forward="lora_forward")``: entry ``forward`` is that module's
    ``lora_forward``. This is how the Triton kernels register: importing ``fastft`` never imports Triton.
    """

    def __init__(self, module: str, **entries: str):
        self.module = module
        self.entries = dict(entries)

    def __contains__(self, entry: str) -> bool:
        return entry in self.entries

    def __getitem__(self, entry: str) -> Callable:
        return getattr(importlib.import_module(self.module), self.entries[entry])

    def __repr__(self) -> str:
        return f"lazy({self.module!r}, {', '.join(f'{k}={v!r}' for k, v in self.entries.items())})"


def register_op(op: str, implementations: Mapping[str, Union[Mapping[str, Callable], lazy]],
                limits: Optional[dict[str, Callable[..., Optional[str]]]] = None,
                node_costs: Optional[Mapping[str, NodeCost]] = None, composite: bool = False) -> None:
    """Register ``op``'s implementations: ``{backend: {entry: callable}}`` (or a :class:`lazy` per backend).

    The reference ``torch`` backend is mandatory and names every entry. ``limits``: for a backend that
    implements only some calls of the op, ``check(**call)`` returning None when it can run the call
    described by the keyword arguments the op passes to :func:`backend_for` (e.g. ``d=``, ``dtype=``),
    else the reason it cannot. ``node_costs``: the FLOP formula of the op's backward per autograd node
    name (``{node_costs.custom_op_node(op): formula}``), written beside the op and read by
    :mod:`fastft.policies.cost` (see :mod:`fastft.node_costs`). ``composite=True``: the op is written in
    torch and other fastft ops (which dispatch themselves), registers only ``torch`` and runs it under any
    backend, a forced ``FASTFT_BACKEND`` included (it applies to the ops the composite calls).
    """
    backends = tuple(implementations)
    unknown = [b for b in backends if b not in KNOWN_BACKENDS]
    if unknown or "torch" not in backends:
        raise ValueError(f"op {op!r}: backends {backends} must include 'torch' and only {KNOWN_BACKENDS}")
    if composite and backends != ("torch",):
        raise ValueError(f"op {op!r}: a composite op registers only its 'torch' entries, got {backends}")
    _OP_BACKENDS[op] = backends
    if composite:
        _COMPOSITE_OPS.add(op)
    else:
        _COMPOSITE_OPS.discard(op)
    _OP_LIMITS[op] = dict(limits or {})
    _OP_IMPLEMENTATIONS[op] = dict(implementations)
    for node_name, formula in (node_costs or {}).items():
        register_node_cost(node_name, formula)
    for cache in (_ENTRY_CACHE, _RESOLVED):
        for key in [k for k in cache if k[0] == op]:
            del cache[key]
    if not _OP_LIMITS[op] and not any(b in _LIBRARY_DEVICE for b in backends):
        _PURE_OPS.add(op)
    else:
        _PURE_OPS.discard(op)


def implementation(op: str, entry: str, device: torch.device | str, **call) -> Callable:
    """The callable of ``op``'s ``entry`` on the backend :func:`backend_for` chooses for ``device`` and ``call``.

    Where the backend registers the entry in two paths (``entry@cublas``, ``entry@triton``) the callable
    chooses between them per call (:func:`choose_path`).
    """
    if op in _COMPOSITE_OPS:  # no choice to make, nothing cached: traceable inside an autograd.Function
        return _OP_IMPLEMENTATIONS[op]["torch"][entry]
    if not call and op in _PURE_OPS:  # the hot path of a layer: one dict look-up per call
        key = (op, entry, device, _raw_env(_BACKEND_KEY), _raw_env(_INTERPRET_KEY))
        found = _RESOLVED.get(key)
        if found is None:
            found = _RESOLVED[key] = _entry(op, backend_for(op, device), entry)
        return found
    backend = backend_for(op, device, **call)
    return _entry(op, backend, entry)


def _environment_reader():
    """``raw(key)``: an environment variable's raw value, or None; ``os.environ.get`` encodes and decodes on
    every call (microseconds a layer on the hot path), so CPython's own mapping is read where it exists."""
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and encode is not None:
        return data.get, encode
    return os.environ.get, (lambda name: name)


_raw_env, _encode_key = _environment_reader()
_BACKEND_KEY = _encode_key("FASTFT_BACKEND")
_INTERPRET_KEY = _encode_key("TRITON_INTERPRET")
_GEMM_KEY = _encode_key("FASTFT_GEMM")

# Resolved (op, entry, device, environment) -> callable, for ops whose choice depends on nothing else (no C
# library whose build state could change the answer, no per-call limits): the choice is made once.
_RESOLVED: dict[tuple, Callable] = {}
_PURE_OPS: set[str] = set()


_ENTRY_CACHE: dict[tuple[str, str, str], Callable] = {}


def _entry(op: str, backend: str, entry: str) -> Callable:
    key = (op, backend, entry)
    found = _ENTRY_CACHE.get(key)
    if found is not None:
        return found
    implementations = _OP_IMPLEMENTATIONS[op]
    chosen = implementations[backend]
    if f"{entry}@cublas" in chosen and f"{entry}@triton" in chosen:
        found = _PathChooser(op, entry, chosen[f"{entry}@cublas"], chosen[f"{entry}@triton"],
                             _OP_PATH_KEYS.get(op, {}).get(entry))
    else:
        found = chosen[entry] if entry in chosen else implementations["torch"][entry]
    _ENTRY_CACHE[key] = found
    return found


# --------------------------------------------------------------------------------------- GEMM paths

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
    if _raw_env(_GEMM_KEY) is None:
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


class _PathChooser:
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


def path_for(op: str, device: torch.device | str) -> str:
    """What the patch report shows: the backend, and for an op with GEMM paths on it, the path(s) it takes."""
    device = torch.device(device)
    backend = backend_for(op, device)
    chosen = _OP_IMPLEMENTATIONS[op][backend]
    if not any(isinstance(e, str) and e.endswith("@cublas") for e in _entries(chosen)):
        return backend
    mode = gemm_mode()
    if mode == "auto" and device.type == "cuda":
        signature = device_signature(device)
        measured: dict[str, int] = {}
        for (cached_op, _entry_name, cached_signature, _key), path in _PATH_CACHE.items():
            if cached_op == op and cached_signature == signature:
                measured[path] = measured.get(path, 0) + 1
        if measured:  # calls already ran: say what the measurements chose
            chosen = ", ".join(f"{GEMM_PATHS[p]} x{n}" for p, n in sorted(measured.items()))
            return f"{backend} (measured: {chosen})"
        return f"{backend} ({GEMM_PATHS['cublas']}; fused Triton GEMM where measured faster)"
    if mode == "auto":
        return f"{backend} ({GEMM_PATHS['triton']}, off a GPU)"
    return f"{backend} ({GEMM_PATHS[mode]}, FASTFT_GEMM={mode})"


def _entries(chosen) -> list:
    return list(chosen.entries) if isinstance(chosen, lazy) else list(chosen)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastft ops on backend ``name`` (or a preference list ``"triton,torch"``) inside the block.

    Sets ``FASTFT_BACKEND``, which :func:`backend_for` reads at every op call, and restores it after.
    """
    old = os.environ.get("FASTFT_BACKEND")
    os.environ["FASTFT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTFT_BACKEND", None)
        else:
            os.environ["FASTFT_BACKEND"] = old


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runnable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        if not triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
    if backend in ("cpp", "cuda"):
        return device.type == _LIBRARY_DEVICE[backend] and _ext.available(_LIBRARY_DEVICE[backend])
    return False


def _not_runnable_reason(backend: str, device: torch.device) -> str:
    if backend == "triton" and device.type == "cpu" and not triton_interpreter_enabled():
        return "Triton runs on the CPU only under TRITON_INTERPRET=1, set before importing fastft"
    if backend in ("cpp", "cuda"):
        wanted = _LIBRARY_DEVICE[backend]
        if device.type != wanted:
            return f"{backend!r} runs on {wanted} tensors only"
        return f"the {backend!r} library is unavailable: {_ext.unavailable_reason(wanted)}"
    return f"{backend!r} cannot run on {device.type}"


def _limit(op: str, backend: str, call: dict) -> Optional[str]:
    check = _OP_LIMITS.get(op, {}).get(backend)
    return check(**call) if check is not None and call else None


def _forced() -> list[str]:
    value = os.environ.get("FASTFT_BACKEND", "").strip()
    if not value:
        return []
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    bad = [name for name in names if name not in KNOWN_BACKENDS]
    if bad:
        raise ValueError(
            f"FASTFT_BACKEND={value!r} names unknown backend(s) {bad}; choose from {list(KNOWN_BACKENDS)} "
            "(or a comma-separated preference list such as 'triton,torch'), or unset it."
        )
    return names


def op_backends(op: str) -> tuple[str, ...]:
    """The backends registered for ``op`` (whether or not they run here)."""
    if op not in _OP_BACKENDS:
        raise KeyError(f"fastft op {op!r} is not registered; known ops: {sorted(_OP_BACKENDS)}")
    return _OP_BACKENDS[op]


def backend_for(op: str, device: torch.device | str, **call) -> str:
    """The backend that runs ``op`` for tensors on ``device``; ``call`` describes the call for ``limits``."""
    device = torch.device(device)
    if op not in _OP_BACKENDS:
        raise KeyError(f"fastft op {op!r} is not registered; known ops: {sorted(_OP_BACKENDS)}")
    if op in _COMPOSITE_OPS:
        return "torch"
    available = _OP_BACKENDS[op]
    forced = _forced()
    if forced:
        reasons = []
        for name in forced:
            if name not in available:
                reasons.append(f"{name!r} does not implement {op!r}")
            elif not _runnable(name, device):
                reasons.append(_not_runnable_reason(name, device))
            elif (limit := _limit(op, name, call)) is not None:
                reasons.append(f"{name!r}: {limit}")
            else:
                return name
        runnable = [b for b in available if _runnable(b, device) and _limit(op, b, call) is None]
        raise RuntimeError(
            f"FASTFT_BACKEND={os.environ['FASTFT_BACKEND']!r} cannot run op {op!r} on {device} "
            f"({'; '.join(reasons)}); backends that can: {runnable}. Change or unset FASTFT_BACKEND."
        )
    if device.type == "cuda" and "triton" in available and _runnable("triton", device):
        return "triton"
    if (device.type == "cpu" and "cpp" in available and _runnable("cpp", device)
            and _limit(op, "cpp", call) is None):
        return "cpp"
    return "torch"


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Which backend each registered op uses on ``device`` (default: CUDA if present, else CPU).

    On the CPU, asking builds the C++ library if it is not built yet (``cpp`` where it runs; ``torch``,
    after one warning saying why, where it cannot be built).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {op: backend_for(op, device) for op in sorted(_OP_BACKENDS)}
