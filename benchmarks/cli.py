"""The command-line options every standalone benchmark shares (``python -m benchmarks.<name>``)."""
from __future__ import annotations

import argparse
from typing import Any, Mapping

import torch


def parse_standalone_args(parser: argparse.ArgumentParser, argv: list[str] | None, quick: Mapping[str, Any],
                          repeats: int | None = None, warmup: int | None = None) -> argparse.Namespace:
    """Finish and parse the command line of a standalone benchmark (``python -m benchmarks.<name>``).

    Adds the options they all share: ``--repeats`` and ``--warmup`` (when given defaults), ``--threads``,
    ``--quick`` (which overrides the shape options with ``quick``) and ``--csv``; then parses ``argv``,
    applies ``--quick`` and sets torch's intra-op thread count when ``--threads`` is given.
    """
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per provider")
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"small shapes: {dict(quick)}")
    parser.add_argument("--csv", metavar="PATH", help="append one row per measurement to this CSV file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
