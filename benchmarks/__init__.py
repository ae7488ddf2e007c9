"""fastft benchmarks: run from the repository root.

``python -m benchmarks`` runs the suite (every op and method against its peers, CSV, plots, summary; see
``benchmarks/README.md`` and ``benchmarks.suite``); ``python -m benchmarks.<name>`` runs one module's
benchmarks with the suite's command line and outputs.

``fastft.measure`` holds the measurement helpers every benchmark shares (bytes saved for backward,
peak live tensor bytes, interleaved timing, FLOPs). ``benchmarks.harness`` is the suite's plug-in
protocol: a module joins the suite with a ``suite_benchmarks()`` function returning
``harness.Benchmark`` objects and one line in ``benchmarks.suite.SUITE_MODULES``.
``benchmarks.records`` is the CSV schema, ``benchmarks.render`` the plots and markdown summary,
``benchmarks.sanity`` the checks applied to every run, ``benchmarks.results_page`` the docs page,
``benchmarks.e2e`` the end-to-end training runs.
"""
import os as _os
import sys as _sys

# ``python -m benchmarks`` puts the repository root first on sys.path, where the tracked ``kernels/__init__.py``
# (fastft's Triton kernels, installed as ``fastft.kernels``) shadows Hugging Face's ``kernels`` distribution that
# transformers imports (so ``import peft`` fails with "cannot import name 'CUDAProperties' from 'kernels'").
# DESIGN.md: kernels/ must be a namespace portion; until its ``__init__.py`` goes, the root moves to the end of
# sys.path here (benchmarks itself is already imported). Remove this block with that file.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    _front = [p for p in _sys.path if _os.path.abspath(p or ".") == _root]
    if _front:
        _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _root] + [_root]

