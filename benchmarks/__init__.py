"""fastft benchmarks: run from the repository root as ``python -m benchmarks.<name>``.

``benchmarks.measure`` holds the measurement helpers every benchmark shares (bytes saved for backward,
peak live tensor bytes, interleaved timing, FLOPs); each other module is one benchmark with a ``main``.
"""
