"""Packaging: the Triton kernels live in the top-level ``kernels/`` folder and install as ``fastft.kernels``.

Never install a top-level module named ``kernels``: transformers and bitsandbytes import a distribution
of that name.

The C/CUDA sources in ``csrc/`` install as data (``fastft/csrc``) and are built lazily on first use
(``fastft/build.py``). With ``FASTFT_BUILD_EXT=1`` they are built here, at install time, with ninja:
into the installed package (``fastft/_prebuilt/``, the wheel then carries a platform tag) or, for an
editable install, into the user's cache. The CPU library must build; the CUDA one is skipped when nvcc
is missing.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUILD_EXT = os.environ.get("FASTFT_BUILD_EXT", "") == "1"

packages = find_packages(include=["fastft", "fastft.*"]) + ["fastft.kernels", "fastft.csrc"]


def _fastft_build():
    """fastft/build.py, loaded by path (it needs nothing beyond the standard library)."""
    spec = importlib.util.spec_from_file_location("_fastft_build", HERE / "fastft" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class BuildPyWithLibraries(build_py):
    def run(self):
        super().run()
        if not BUILD_EXT:
            return
        build = _fastft_build()
        if getattr(self, "editable_mode", False):
            for kind in ("cpu", "cuda"):
                try:
                    _, built = build.load(kind)
                    print(f"fastft: {build.LIBRARIES[kind].title} ready: {built.path}")
                except build.BuildError as error:
                    if kind == "cpu" or not str(error).startswith("nvcc not found"):
                        raise
                    print(f"fastft: CUDA library skipped: {error}")
        else:
            build.build_prebuilt(Path(self.build_lib) / "fastft" / "_prebuilt")


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # a wheel carrying prebuilt libraries is platform-specific
        return BUILD_EXT


setup(
    packages=packages,
    package_dir={"fastft.kernels": "kernels", "fastft.csrc": "csrc"},
    package_data={"fastft.csrc": ["*.h", "*.cuh", "*.cpp", "*.cu", "README.md"]},
    cmdclass={"build_py": BuildPyWithLibraries},
    distclass=BinaryDistribution,
)
