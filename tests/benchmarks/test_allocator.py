"""benchmarks/allocator.py: under ``freed_memory_kept`` a 64 MiB tensor allocated again and again reuses pages already
faulted in (glibc's default maps it fresh every time: one page fault per 4 KiB page); afterwards glibc's defaults
are back (memory the heap kept may still serve blocks that fit in it, so the check uses a larger one). Run in a fresh interpreter: the test must not change the malloc settings of the pytest process. Full runs
record the allocator in every row; --quick keeps the system's; end-to-end rows (own processes) say so."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import allocator, records, suite
from benchmarks.harness import Benchmark, Case, Measurement
from benchmarks.presentation import conditions

REPO_ROOT = Path(__file__).resolve().parents[2]

FAULTS_PER_ALLOCATION = textwrap.dedent("""
    import json, resource, torch
    from benchmarks import allocator

    def faults(rows=4096, times=12):
        out = []
        for _ in range(times):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(rows, 4096)
            x.fill_(1.0)
            del x
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    result = {"system": faults()}
    with allocator.freed_memory_kept(torch.device("cpu")):
        faults()  # glibc settles its free lists over the first allocations (the suite's warm-up rounds)
        result["kept"] = faults()
    # the defaults again: a block larger than anything the heap kept (512 MiB) is mapped fresh every time
    result["after"] = faults(rows=32768, times=3)
    print(json.dumps(result))
""")


@pytest.mark.skipif(allocator._glibc() is None, reason="freed_memory_kept changes glibc malloc only (Linux)")
def test_kept_memory_is_reused_without_page_faults():
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 4096 * 4096 * 4 // 4096
    assert min(result["system"]) >= pages  # glibc's default: a fresh mapping, every page faulted in
    assert max(result["kept"]) == 0
    assert min(result["after"]) >= 8 * pages  # the defaults are back (what the heap kept may still serve smaller blocks)


def _one_case(own_process: bool) -> Benchmark:
    run = lambda ctx: [Measurement("fastft", "torch", "fastft", "step", "time", "s", 1e-3)]  # noqa: E731
    return Benchmark("toy", lambda ctx: [Case("toy", dict(n=1), ("n",), run, own_process=own_process)], "a toy")


@pytest.mark.parametrize("argv, own_process, expected", [
    ([], False, allocator.describe("kept", torch.device("cpu"))),
    (["--allocator", "system"], False, allocator.SYSTEM),
    ([], True, f"{allocator.SYSTEM} (measured in a process of its own)"),
])
def test_rows_state_the_allocator(tmp_path, argv, own_process, expected):
    outcome = suite.run(["--repeats", "1", "--no-progress", "--no-render", "--device", "cpu", "--out", str(tmp_path)]
                        + argv, benchmarks=[_one_case(own_process)])
    assert outcome.failures == []
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["allocator"] == expected for r in rows)
    assert f"allocator: {expected}" in conditions(records.read_rows(tmp_path / "results.csv"))


def test_quick_keeps_the_system_allocator(tmp_path):
    suite.run(["--quick", "--no-progress", "--no-render", "--device", "cpu", "--out", str(tmp_path)],
              benchmarks=[_one_case(False)])
    with open(tmp_path / "results.csv", newline="") as f:
        assert {r["allocator"] for r in csv.DictReader(f)} == {allocator.SYSTEM}
