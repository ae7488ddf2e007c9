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
