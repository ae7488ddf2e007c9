"""Packaging: the Triton kernels live in the top-level ``kernels/`` folder and install as ``fastft.kernels``.

Never install a top-level module named ``kernels``: transformers and bitsandbytes import a distribution
of that name.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastft", "fastft.*"]) + ["fastft.kernels"]

setup(
    packages=packages,
    package_dir={"fastft.kernels": "kernels"},
)
