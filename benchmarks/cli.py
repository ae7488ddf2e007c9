"""The command line of ``python -m benchmarks`` (see ``benchmarks.suite`` for the usage) and the run context it
makes: device, sweep size and timing settings.
"""
from __future__ import annotations

import argparse

import torch

from . import allocator
from .protocol import Context
from .records import Environment

DEFAULT_OUT = "bench-results"
QUICK_TIMING = dict(repeats=5, warmup=1, rounds=2, rep_ms=50)
FULL_TIMING = dict(repeats=10, warmup=2, rounds=3, rep_ms=100)


def parse_args(argv: list[str] | None, prog: str = "python -m benchmarks", doc: str | None = None) -> argparse.Namespace:
    """The parsed options; ``doc`` (the usage text: ``benchmarks.suite``'s docstring) gives the help."""
    doc = doc or __doc__
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=(doc.split("\n\n", 1)[1:] or [None])[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and fewer timed runs")
    parser.add_argument("--full", action="store_true",
                        help="full-size shapes for a subset of the cases (about 4 min on a quiet 2-core CPU; FULL_SUBSET)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names or tags to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names or tags to leave out")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="CPU: timed rounds per mode (quick 5, full 10)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop starting new cases after this long (the rest are recorded as skipped)")
    parser.add_argument("--list", action="store_true", help="list the cases and their estimated durations; run nothing")
    parser.add_argument("--no-render", action="store_true", help="write the CSV only (no plots, no summary.md)")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines instead of a bar")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a sanity check warns and nothing explains it (benchmarks.sanity)")
    parser.add_argument("--allocator", choices=("kept", "system"), default=None,
                        help="CPU: 'kept' times with glibc keeping freed memory for reuse, as a GPU caching allocator "
                             "does (default in full runs; benchmarks.allocator), 'system' with glibc's defaults "
                             "(default in --quick)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="build the torch.compile peers (default: in the full sweep, not in --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave the torch.compile peers out")
    args = parser.parse_args(argv)
    if args.full and args.quick:
        parser.error("--full and --quick exclude each other (--full: full-size shapes, a subset of the cases)")
    if args.allocator is None:
        args.allocator = "system" if args.quick else "kept"
    args.prog = prog
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    args.skip = [n.strip() for n in args.skip.split(",") if n.strip()]
    return args


def make_context(args: argparse.Namespace) -> Context:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available to this torch "
                             f"({torch.__version__}); use --device cpu")
        device = torch.device(args.device)
    timing = dict(QUICK_TIMING if args.quick else FULL_TIMING)
    if args.repeats:
        timing["repeats"] = args.repeats
    compile_peers = (not args.quick) if args.compile is None else args.compile
    env = Environment.current(device, sweep="quick" if args.quick else "full", command=command_line(args),
                              allocator=allocator.describe(args.allocator, device))
    return Context(device=device, quick=args.quick, env=env, compile=compile_peers, **timing)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (its argv as given, after the program's name)."""
    import shlex

    return " ".join([args.prog, *(shlex.quote(a) for a in getattr(args, "argv", []))])
