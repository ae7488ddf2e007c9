"""Build, cache and load fastft's two C libraries (``csrc/``): ``libfastft_cpu`` and ``libfastft_cuda``.

Both are plain shared libraries with C entry points (``csrc/fastft.h``: pointers, shapes, strides, a CUDA
stream as ``void*``), loaded with ``ctypes``. Neither includes a torch header nor links against torch,
so one build serves every torch version, and building the CUDA library needs ``nvcc`` but no
CUDA-enabled torch. ``fastft/_ext.py`` declares the entry points and calls them on tensors.

When they are built
    * lazily, the first time an op needs one (``fastft/_ext.py``), into the user's cache;
    * at install time with ``FASTFT_BUILD_EXT=1 pip install .`` (setup.py calls :func:`build_prebuilt`):
      into the installed package (``fastft/_prebuilt/``), or into the cache for an editable install;
    * on demand: ``python -m fastft.build`` builds both and prints what, where and with which compiler.

Where
    ``$FASTFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastft``, else ``~/.cache/fastft``; one directory per
    build key, ``<root>/fastft_cpu-<key[:20]>/``, holding the copied sources, ``build.ninja``, the library
    and ``stamp.json``. Builds run in a temporary directory that is renamed into place when complete,
    under a file lock, so concurrent processes never load a half-written library. Builds for older
    sources are left in place (delete the directory to reclaim the space).

The key
    ``source_key`` = SHA-256 of the C ABI version, the library, the bytes of every source and header it
    uses, and what the machine code depends on besides the compiler (for the CPU library the CPU's
    instruction-set flags, because it is built with ``-march=native``; for the CUDA library the GPU
    architectures). ``key`` = SHA-256 of ``source_key``, the compiler's path and ``--version`` and the
    flags. The torch version is not part of it.

Stale or corrupted builds
    A library is used only if its directory's ``stamp.json`` names the expected key, it loads
    (``dlopen``), its ``fastft_*_abi_version()`` is :data:`ABI_VERSION` and its ``fastft_*_build_id()``
    is the key compiled into it. Anything else (an edited source, another compiler, a truncated file, a
    library copied from elsewhere) is rebuilt. Each build gets a file name of its own, so a rebuilt
    library is never confused with one already loaded in the process.

Tools
    ninja: the ``ninja`` PyPI package (a dependency of fastft), else ``ninja`` on PATH. C++ compiler:
    ``$CXX``, else ``c++``, ``g++``, ``clang++`` on PATH; flags ``-O3 -std=c++17 -ffp-contract=off``,
    plus ``-march=native`` and ``-fopenmp`` where the compiler accepts them (probed once per compiler
    binary and remembered in ``<root>/toolchain-*.json``), plus ``$FASTFT_CXXFLAGS``.
    nvcc: ``$FASTFT_NVCC``, else ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on PATH, ``/usr/local/cuda/bin/nvcc``;
    architectures ``$FASTFT_CUDA_ARCHS`` (default ``80;90``: sm_80 and sm_90 code, plus compute_90 PTX
    that newer GPUs compile at load time); cudart is linked statically.

This module imports nothing outside the standard library (setup.py loads it by path, before torch may
be installed).
"""
from __future__ import annotations

import argparse
import ctypes
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = [
    "ABI_VERSION",
    "BuildError",
    "Built",
    "LIBRARIES",
    "build_prebuilt",
    "cache_root",
    "load",
    "main",
]

ABI_VERSION = 1
"""Must equal FASTFT_C_ABI_VERSION in csrc/fastft.h; bump both when a C signature or struct changes."""

DEFAULT_CUDA_ARCHS = "80;90"


class BuildError(RuntimeError):
    """A library cannot be built or loaded here; the message says why and what to do."""


@dataclass(frozen=True)
class LibrarySpec:
    kind: str  # "cpu" or "cuda": also the infix of its C symbols (fastft_cpu_*)
    title: str
    sources: tuple[str, ...]
    headers: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"fastft_{self.kind}"


LIBRARIES = {
    "cpu": LibrarySpec("cpu", "C++ CPU library", ("hadamard_cpu.cpp", "library_cpu.cpp"),
                       ("fastft.h", "quantize.h", "errors.h", "dtypes_cpu.h")),
    "cuda": LibrarySpec("cuda", "CUDA library", ("hadamard_cuda.cu", "dequantize_4bit_cuda.cu", "library_cuda.cu"),
                        ("fastft.h", "quantize.h", "errors.h", "cuda_common.cuh")),
}


@dataclass
class Toolchain:
    compiler: str  # absolute path
    version: str  # first line of `compiler --version`
    cflags: list[str]
    ldflags: list[str]
    ninja: str
    notes: list[str] = field(default_factory=list)  # flags the compiler refused, archs ...


@dataclass
class Built:
    """A built library: where it is and how it was made."""

    kind: str
    path: Path
    key: str
    compiler: str
    compiler_version: str
    flags: list[str]
    origin: str  # "built", "cache" or "prebuilt"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    rebuilt_because: Optional[str] = None


# --------------------------------------------------------------------------- locations
def csrc_dir() -> Path:
    """The C sources: ``fastft/csrc`` in an installed package, ``<repo>/csrc`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "fastft.h").is_file():
            return candidate
    raise BuildError(f"fastft's C sources (csrc/fastft.h) are neither in {here / 'csrc'} nor in {here.parent / 'csrc'}")


def cache_root() -> Path:
    """``$FASTFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastft``, else ``~/.cache/fastft``."""
    if os.environ.get("FASTFT_CACHE_DIR"):
        return Path(os.environ["FASTFT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastft"


def prebuilt_root() -> Path:
    return Path(__file__).resolve().parent / "_prebuilt"


# --------------------------------------------------------------------------- tools
def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _version(tool: str) -> str:
    try:
        out = _run([tool, "--version"], timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"{tool} --version failed: {error}") from None
    lines = [line for line in out if line.strip()]
    if not lines:
        return "unknown version"
    if "nvcc" in os.path.basename(tool):  # "Cuda compilation tools, release 13.0, V13.0.88"
        return next((line for line in lines if "release" in line), lines[-1])
    return lines[0]


def find_ninja() -> str:
    try:
        import ninja  # the PyPI package ships the binary

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.access(path, os.X_OK):
            return path
    except Exception:
        pass
    path = shutil.which("ninja")
    if path:
        return path
    raise BuildError("ninja not found: `pip install ninja` (the PyPI package ships the binary)")


def find_cxx() -> str:
    requested = os.environ.get("CXX")
    if requested:
        path = shutil.which(requested)
        if not path:
            raise BuildError(f"CXX={requested!r} is not an executable compiler; fix or unset CXX")
        return path
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("no C++ compiler found (tried $CXX, c++, g++, clang++ on PATH); install g++ or clang++, "
                     "or set CXX")


def find_nvcc() -> str:
    requested = os.environ.get("FASTFT_NVCC")
    if requested:
        path = shutil.which(requested)
        if not path:
            raise BuildError(f"FASTFT_NVCC={requested!r} is not an executable; fix or unset it")
        return path
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise BuildError("nvcc not found (tried $FASTFT_NVCC, $CUDA_HOME/bin/nvcc, nvcc on PATH, "
                     "/usr/local/cuda/bin/nvcc); install the CUDA toolkit to build the CUDA library")


_PROBE = "#include <math.h>\n#ifdef _OPENMP\n#include <omp.h>\n#endif\nint main() { return 0; }\n"


def _accepts(cxx: str, flags: list[str]) -> bool:
    try:
        return _run([cxx, "-x", "c++", "-fsyntax-only", *flags, "-"], input=_PROBE, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cpu_toolchain() -> Toolchain:
    """The C++ compiler, its version and the flags it accepts (probed once per compiler, remembered in the cache)."""
    cxx = find_cxx()
    ninja = find_ninja()
    stat = os.stat(cxx)
    identity = json.dumps([os.path.realpath(cxx), stat.st_mtime_ns, stat.st_size, os.environ.get("FASTFT_CXXFLAGS", ""),
                           ABI_VERSION])
    memo = cache_root() / f"toolchain-{hashlib.sha256(identity.encode()).hexdigest()[:20]}.json"
    try:
        known = json.loads(memo.read_text())
        return Toolchain(cxx, known["version"], known["cflags"], known["ldflags"], ninja, known["notes"])
    except (OSError, ValueError, KeyError):
        pass
    tools = _probe_cpu_toolchain(cxx, ninja)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(version=tools.version, cflags=tools.cflags, ldflags=tools.ldflags,
                                       notes=tools.notes)))
        os.replace(tmp, memo)
    except OSError:
        pass
    return tools


def _probe_cpu_toolchain(cxx: str, ninja: str) -> Toolchain:
    version = _version(cxx)
    cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off"]
    ldflags = ["-shared"]
    notes = []
    if not _accepts(cxx, cflags):
        raise BuildError(f"{cxx} ({version}) does not compile C++17 with {' '.join(cflags)}")
    if _accepts(cxx, cflags + ["-march=native"]):
        cflags.append("-march=native")
    else:
        notes.append("-march=native refused: generic instruction set")
    if _accepts(cxx, cflags + ["-fopenmp"]):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    else:
        notes.append("OpenMP unavailable (-fopenmp refused): the CPU kernels run on one thread")
    extra = shlex.split(os.environ.get("FASTFT_CXXFLAGS", ""))
    return Toolchain(cxx, version, cflags + extra, ldflags, ninja, notes)


def cuda_archs() -> list[str]:
    value = os.environ.get("FASTFT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", value) if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise BuildError(f"FASTFT_CUDA_ARCHS={value!r}: give compute capabilities such as '80;90'")
    return archs


def cuda_toolchain() -> Toolchain:
    nvcc = find_nvcc()
    ninja = find_ninja()
    archs = cuda_archs()
    cflags = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC,-fvisibility=hidden"]
    for arch in archs:
        cflags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    top = max(archs, key=int)
    cflags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    host = os.environ.get("CUDAHOSTCXX")
    if host:
        cflags += ["-ccbin", host]
    extra = shlex.split(os.environ.get("FASTFT_NVCCFLAGS", ""))
    notes = [f"GPU code for {', '.join('sm_' + a for a in archs)}, PTX for compute_{top}"]
    return Toolchain(nvcc, _version(nvcc), cflags + extra, ["-shared", "-cudart", "static"], ninja, notes)


def toolchain(kind: str) -> Toolchain:
    return cpu_toolchain() if kind == "cpu" else cuda_toolchain()


# --------------------------------------------------------------------------- keys
def _cpu_signature() -> str:
    """What -march=native depends on: the machine and the CPU's instruction-set flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    text += " " + " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        text += " " + platform.processor()
    return text


def source_key(kind: str) -> str:
    spec = LIBRARIES[kind]
    root = csrc_dir()
    files = {}
    for name in spec.sources + spec.headers:
        path = root / name
        if not path.is_file():
            raise BuildError(f"missing source {path}")
        files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    extra = _cpu_signature() if kind == "cpu" else ";".join(cuda_archs())
    blob = json.dumps(dict(abi=ABI_VERSION, kind=kind, files=files, machine=extra), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_key(kind: str, tools: Toolchain) -> str:
    blob = json.dumps(dict(source=source_key(kind), compiler=tools.compiler, version=tools.version,
                           cflags=tools.cflags, ldflags=tools.ldflags), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- building
def _ninja_escape(text: str) -> str:
    return text.replace("$", "$$").replace("\n", " ")


def _write_ninja(build_dir: Path, spec: LibrarySpec, tools: Toolchain, key: str, lib_name: str) -> None:
    define = f"-DFASTFT_BUILD_ID=\\\"{key}\\\""
    compiler = shlex.quote(tools.compiler)
    cflags = " ".join(shlex.quote(f) for f in tools.cflags) + " " + define
    lines = [
        "ninja_required_version = 1.3",
        f"cc = {_ninja_escape(compiler)}",
        f"cflags = {_ninja_escape(cflags)}",
        f"ldflags = {_ninja_escape(' '.join(shlex.quote(f) for f in tools.ldflags))}",
        "rule compile",
        "  command = $cc $cflags -Isrc -c $in -o $out",
        "  description = compile $in",
        "rule link",
        "  command = $cc $in -o $out $ldflags",
        "  description = link $out",
    ]
    objects = []
    for source in spec.sources:
        obj = source.rsplit(".", 1)[0] + ".o"
        objects.append(obj)
        lines.append(f"build {obj}: compile src/{source}")
    lines.append(f"build {lib_name}: link {' '.join(objects)}")
    lines.append(f"default {lib_name}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")


def _compile(kind: str, tools: Toolchain, key: str, dest: Path) -> Built:
    """Build library ``kind`` into the new directory ``dest`` (built in a sibling temporary directory)."""
    spec = LIBRARIES[kind]
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        (tmp / "src").mkdir()
        for name in spec.sources + spec.headers:
            shutil.copyfile(csrc_dir() / name, tmp / "src" / name)
        lib_name = f"lib{spec.name}-{uuid.uuid4().hex[:12]}.so"
        _write_ninja(tmp, spec, tools, key, lib_name)
        jobs = str(max(1, min(len(spec.sources), os.cpu_count() or 1)))
        result = _run([tools.ninja, "-C", str(tmp), "-j", jobs])
        (tmp / "build.log").write_text(result.stdout)
        if result.returncode != 0:
            log = dest.parent / f"{dest.name}.failed.log"
            log.write_text(result.stdout)
            tail = "\n".join(result.stdout.strip().splitlines()[-25:])
            raise BuildError(f"building the fastft {spec.title} with {tools.compiler} failed (full log: {log}):\n{tail}")
        seconds = time.perf_counter() - start
        stamp = dict(key=key, source_key=source_key(kind), abi=ABI_VERSION, library=lib_name, compiler=tools.compiler,
                     compiler_version=tools.version, cflags=tools.cflags, ldflags=tools.ldflags, notes=tools.notes,
                     seconds=round(seconds, 2), built=time.strftime("%Y-%m-%d %H:%M:%S"))
        (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1))
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Built(kind, dest / lib_name, key, tools.compiler, tools.version, tools.cflags + tools.ldflags, "built",
                 seconds, list(tools.notes))


# --------------------------------------------------------------------------- loading
def _symbol(lib: ctypes.CDLL, kind: str, name: str):
    return getattr(lib, f"fastft_{kind}_{name}")


def _open_verified(kind: str, path: Path, key: str) -> ctypes.CDLL:
    """dlopen ``path`` and check its ABI version and build id; BuildError saying what is wrong otherwise."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise BuildError(f"cannot load {path}: {error}") from None
    try:
        abi = _symbol(lib, kind, "abi_version")
        build_id = _symbol(lib, kind, "build_id")
    except AttributeError as error:
        raise BuildError(f"{path} is not a fastft {kind} library: {error}") from None
    abi.restype = ctypes.c_int
    build_id.restype = ctypes.c_char_p
    if abi() != ABI_VERSION:
        raise BuildError(f"{path} has C ABI version {abi()}, this fastft needs {ABI_VERSION}")
    found = (build_id() or b"").decode(errors="replace")
    if found != f"fastft-build-id:{key}":
        raise BuildError(f"{path} was built from other sources or flags (build id {found[16:32]}…, expected {key[:16]}…)")
    return lib


def _read_stamp(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): no cross-process lock
            pass
        yield


def _from_stamp(kind: str, directory: Path, stamp: dict, origin: str) -> Built:
    return Built(kind, directory / stamp["library"], stamp["key"], stamp.get("compiler", "?"),
                 stamp.get("compiler_version", "?"), stamp.get("cflags", []) + stamp.get("ldflags", []), origin,
                 stamp.get("seconds", 0.0), stamp.get("notes", []))


def _load_prebuilt(kind: str) -> Optional[tuple[ctypes.CDLL, Built]]:
    directory = prebuilt_root() / kind
    stamp = _read_stamp(directory)
    if stamp is None:
        return None
    try:
        if stamp.get("source_key") != source_key(kind):
            return None
        built = _from_stamp(kind, directory, stamp, "prebuilt")
        return _open_verified(kind, built.path, built.key), built
    except (BuildError, KeyError):
        return None


def load(kind: str, force: bool = False) -> tuple[ctypes.CDLL, Built]:
    """The loaded library ``kind`` ("cpu" or "cuda"), building it first if needed; BuildError if it cannot be.

    Order: a matching prebuilt library installed with the package, else the cache directory for the
    current key (verified as the module docstring says), else a fresh build into it. ``force`` rebuilds.
    """
    if kind not in LIBRARIES:
        raise ValueError(f"unknown fastft library {kind!r}; choose from {sorted(LIBRARIES)}")
    if not force:
        found = _load_prebuilt(kind)
        if found is not None:
            return found
    tools = toolchain(kind)
    key = build_key(kind, tools)
    directory = cache_root() / f"{LIBRARIES[kind].name}-{key[:20]}"
    with _locked(directory.parent / f"{directory.name}.lock"):
        reason = "forced" if force else None
        if not force:
            stamp = _read_stamp(directory)
            if stamp is None:
                reason = "no stamp" if directory.exists() else None
            elif stamp.get("key") != key or "library" not in stamp:
                reason = "stale stamp"
            else:
                built = _from_stamp(kind, directory, stamp, "cache")
                try:
                    return _open_verified(kind, built.path, key), built
                except BuildError as error:
                    reason = str(error)
        built = _compile(kind, tools, key, directory)
        built.rebuilt_because = reason
        return _open_verified(kind, built.path, key), built


def build_prebuilt(target: Path, kinds: tuple[str, ...] = ("cpu", "cuda"), log=print) -> list[Built]:
    """Build the libraries into ``target/<kind>/`` (setup.py with FASTFT_BUILD_EXT=1).

    The CPU library must build (BuildError otherwise); the CUDA library is skipped with a message when
    nvcc is missing, and its build errors are raised.
    """
    results = []
    for kind in kinds:
        try:
            tools = toolchain(kind)
        except BuildError as error:
            if kind == "cuda":
                log(f"fastft: CUDA library skipped: {error}")
                continue
            raise
        built = _compile(kind, tools, build_key(kind, tools), Path(target) / kind)
        built.origin = "prebuilt"
        for leftover in built.path.parent.iterdir():  # keep the library, its stamp and the log
            if leftover != built.path and leftover.name not in ("stamp.json", "build.log"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        log(f"fastft: built the {LIBRARIES[kind].title} in {built.seconds:.1f} s with {tools.compiler} "
            f"({tools.version}): {built.path}")
        results.append(built)
    return results


# --------------------------------------------------------------------------- python -m fastft.build
def describe(built: Built) -> str:
    spec = LIBRARIES[built.kind]
    what = {"built": f"built in {built.seconds:.1f} s", "cache": "up to date (cached build)",
            "prebuilt": "up to date (built at install time)"}[built.origin]
    if built.rebuilt_because:
        what += f"; rebuilt because: {built.rebuilt_because}"
    lines = [
        f"fastft {spec.title} ({spec.name}): {what}",
        f"  library:  {built.path}",
        f"  compiler: {built.compiler} ({built.compiler_version})",
        f"  flags:    {' '.join(built.flags)}",
        f"  key:      {built.key[:20]}  (cache root {cache_root()})",
    ]
    lines += [f"  note:     {note}" for note in built.notes]
    return "\n".join(lines)


def _device_line(lib: ctypes.CDLL) -> str:
    count = lib.fastft_cuda_device_count
    count.restype = ctypes.c_int
    error = lib.fastft_cuda_last_error
    error.restype = ctypes.c_char_p
    n = count()
    if n < 1:
        return f"  device:   {error().decode(errors='replace')} (the library loads; calls raise this error)"
    return f"  device:   {n} CUDA device(s) visible"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft.build", description="Build fastft's C++ (CPU) and CUDA "
                                     "libraries into the cache and print what was built, where, with which compiler.")
    parser.add_argument("--cpu", action="store_true", help="only the C++ CPU library")
    parser.add_argument("--cuda", action="store_true", help="only the CUDA library")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    args = parser.parse_args(argv)
    kinds = [k for k, wanted in (("cpu", args.cpu), ("cuda", args.cuda)) if wanted] or ["cpu", "cuda"]
    status = 0
    for kind in kinds:
        try:
            lib, built = load(kind, force=args.force)
        except BuildError as error:
            skipped = kind == "cuda" and not args.cuda and str(error).startswith("nvcc not found")
            print(f"fastft {LIBRARIES[kind].title}: {'skipped' if skipped else 'FAILED'}: {error}")
            status = status if skipped else 1
            continue
        print(describe(built))
        if kind == "cuda":
            print(_device_line(lib))
    return status


if __name__ == "__main__":
    sys.exit(main())
