"""Compile what a Triton launch compiles, for a GPU this machine does not have (used by
``tests/kernels/test_gpu_static_compile.py``; knows nothing of fastft's kernels).

How (Triton 3.9; see ``docs/gpu.md``):

1. :func:`pretend_gpu` makes torch report an A100 (sm_80) or H100 (sm_90): ``torch.cuda.get_device_properties``
   answers with that card's SM count and shared memory, and the ``functools.lru_cache``-wrapped functions of
   the given modules are cleared so no answer of an earlier target survives. The launchers then pick the
   tiles, splits and grids they would pick on that card.
2. :func:`capture_launches` replaces ``JITFunction.run`` for the duration: a launcher called on ``meta``
   tensors reaches it with its real arguments, and the replacement does what ``run`` does up to the compile —
   Triton's own binder (``create_function_from_signature``: dtypes, 16-byte pointer alignment, integers
   divisible by 16, integers equal to 1 turned into constants) and ``_pack_args`` (signature, constexprs,
   attributes, parsed options) for the target's backend — records it, and returns without launching. A meta
   tensor's ``data_ptr()`` is its byte offset from 0, so alignment is judged as for a fresh CUDA allocation
   (256-byte aligned) plus the view's offset.
3. :func:`compile_launch` runs ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target)`` with the
   bundled ptxas, reads ``shared`` from the kernel's metadata and the registers, spill stores/loads and stack
   frame from ptxas's ``-v`` log (captured from ``make_cubin``; Triton reads ``n_regs``/``n_spills`` only when it
   loads the binary on a device). Results are cached as JSON by Triton's own cache key (source, options,
   backend, ptxas version), so a rerun compiles only what changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import types
from pathlib import Path
from typing import Callable, Iterable, Optional


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "sm_80"
    arch: int  # 80
    card: str  # "A100 SXM"
    sms: int
    shared_per_block: int  # bytes: the opt-in maximum of dynamic shared memory per block


TARGETS = {
    "sm_80": Target("sm_80", 80, "NVIDIA A100-SXM4-80GB", 108, 163 * 1024),
    "sm_90": Target("sm_90", 90, "NVIDIA H100 80GB HBM3", 132, 227 * 1024),
}


# ----------------------------------------------------------------------------------------- pretend a GPU
def _fake_properties(target: Target):
    return types.SimpleNamespace(
        name=target.card, major=target.arch // 10, minor=target.arch % 10, multi_processor_count=target.sms,
        total_memory=80 * 2**30, shared_memory_per_block_optin=target.shared_per_block,
        shared_memory_per_multiprocessor=target.shared_per_block + 1024, max_threads_per_multi_processor=2048,
        warp_size=32, L2_cache_size=(40 if target.arch == 80 else 50) * 2**20, regs_per_multiprocessor=65536,
    )


def _clear_lru_caches(modules: Iterable[types.ModuleType]) -> None:
    for module in modules:
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
                value.cache_clear()


@contextlib.contextmanager
def pretend_gpu(target: Target, modules: Iterable[types.ModuleType]):
    """torch reports ``target``'s card as device 0 (properties only: nothing runs)."""
    import torch

    modules = list(modules)
    saved = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda device=None: _fake_properties(target)
    _clear_lru_caches(modules)
    try:
        yield
    finally:
        torch.cuda.get_device_properties = saved
        _clear_lru_caches(modules)


# ------------------------------------------------------------------------------------------ capture launches
@dataclasses.dataclass
class Launch:
    """One kernel launch as Triton would compile it."""

    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    grid: tuple
    origin: str  # which scenario launched it

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    def identity(self) -> str:
        """What makes two launches the same compiled kernel (the grid does not)."""
        parts = (self.fn.fn.__module__, self.kernel, sorted(self.signature.items()),
                 sorted((str(k), repr(v)) for k, v in self.constexprs.items()),
                 sorted((str(k), repr(v)) for k, v in self.attrs.items()), sorted(self.options.items()))
        return repr(parts)


@contextlib.contextmanager
def capture_launches(target: Target, sink: list, origin: Callable[[], str]):
    """``JITFunction.run`` binds and records instead of compiling and launching (see the module docstring)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", target.arch, 32))
    binders: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        # as JITFunction.run (Triton 3.9) up to the compile, with the target's backend instead of the device's
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        if callable(grid):
            grid = grid(bound_args)
        sink.append(Launch(self, signature, constexprs, attrs, dict(options.__dict__), tuple(grid), origin()))
        return None

    saved = jit.JITFunction.run
    jit.JITFunction.run = run
    try:
        yield sink
    finally:
        jit.JITFunction.run = saved


# ------------------------------------------------------------------------------------------------ compile
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes of the (single) entry function in a ``ptxas -v`` log."""
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if not regs or not spills:
        raise ValueError(f"no register/spill lines in the ptxas log:\n{log[-2000:]}")
    stack, stores, loads = (int(v) for v in spills[-1])
    return dict(regs=int(regs[-1]), stack=stack, spill_stores=stores, spill_loads=loads)


@functools.lru_cache(maxsize=None)
def _log_capturing_backend():
    """Wrap ``CUDABackend.make_cubin`` once so each call leaves its ptxas ``-v`` log in ``_PTXAS_LOGS``."""
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    original = CUDABackend.make_cubin

    def make_cubin(self, src, metadata, opt, capability):
        out = io.StringIO()
        with knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(out):
                cubin = original(self, src, metadata, opt, capability)
        _PTXAS_LOGS.append(out.getvalue())
        return cubin

    CUDABackend.make_cubin = make_cubin
    return True


_PTXAS_LOGS: list = []


def compile_launch(launch: Launch, target: Target, cache_dir: Optional[Path]) -> dict:
    """Compile ``launch`` for ``target``: {ok, regs, spill_stores, spill_loads, stack, shared, seconds, error}."""
    import time

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key

    gpu = GPUTarget("cuda", target.arch, 32)
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    backend = make_backend(gpu)
    options = backend.parse_options(dict(launch.options, **src.parse_options()))
    key = hashlib.sha256(get_cache_key(src, backend, options, get_cache_invalidating_env_vars()).encode()).hexdigest()
    stored = cache_dir / f"{key}.json" if cache_dir is not None else None
    if stored is not None and stored.exists():
        return dict(json.loads(stored.read_text()), cached=True)
    _log_capturing_backend()
    del _PTXAS_LOGS[:]
    start = time.perf_counter()
    try:
        with knobs.compilation.scope():
            knobs.compilation.always_compile = True  # ptxas must run: its log is the register/spill report
            compiled = triton.compile(src, target=gpu, options=launch.options)
        result = dict(ok=True, shared=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
                      num_stages=int(compiled.metadata.num_stages), **parse_ptxas_log(_PTXAS_LOGS[-1]))
    except Exception as error:  # reported by the test with the launch that caused it
        result = dict(ok=False, error=f"{type(error).__name__}: {str(error)[-3000:]}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    if stored is not None and result["ok"]:
        stored.parent.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result))
        tmp.replace(stored)
    return dict(result, cached=False)


def describe(launch: Launch) -> dict:
    """The launch in plain JSON: kernel, pointer/scalar types with their attributes, constexprs, options."""
    attrs = {}
    for path, values in launch.attrs.items():
        index = path[0] if isinstance(path, tuple) else path
        name = list(launch.signature)[index] if isinstance(index, int) else str(index)
        attrs[name] = [list(v) for v in values]
    return dict(
        kernel=launch.kernel, module=launch.fn.fn.__module__, origin=launch.origin,
        signature={k: v for k, v in launch.signature.items() if v != "constexpr"},
        constexprs={str(launch.signature and list(launch.signature)[k[0]] if isinstance(k, tuple) else k): repr(v)
                    for k, v in launch.constexprs.items()},
        attrs=attrs, num_warps=launch.options.get("num_warps"), num_stages=launch.options.get("num_stages"),
        grid=list(launch.grid),
    )
