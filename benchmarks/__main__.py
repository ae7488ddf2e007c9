"""``python -m benchmarks``: the benchmark suite (see ``benchmarks.suite``)."""
import sys
import warnings

warnings.filterwarnings("ignore", message=".*kernels-community.*")

from .suite import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
