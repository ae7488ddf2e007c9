"""Mutation check: inject classic bugs into fastft's op references, modules and Triton kernels, and assert that
the test meant to catch each one fails.

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py -k dora    # the mutations whose name contains "dora"
    python tests/mutation_check.py --list     # the table of mutations, nothing run

Each mutation is (name, file, exact source snippet, replacement, the small test subset expected to fail). The
repository is copied once to a temporary directory (never the working tree): ``fastft/`` with ``kernels/``
and ``csrc/`` placed where an installed package has them, and ``tests/``. For each mutation the snippet is
replaced in the copy, the subset runs there (``pytest -x``, the copy's fastft first on ``sys.path``), the
file is restored. A snippet found zero or several times is an error: a rename or a refactor must update this
list, not silently drop a mutation. Before any mutation the subsets run once unmutated and must pass.
Exit status 0 only when every mutation was killed; a table of mutation -> killing test is printed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    snippet: str
    replacement: str
    tests: tuple[str, ...]  # pytest node ids / files (relative to the root), with "-k" allowed


MUTATIONS = [
    # --- the survivors of issue 20 -------------------------------------------------------------------
    Mutation("lora merge drops the scale (W + B·A)", "fastft/nn/lora.py",
             "return self.scale * (self.lora_B.detach() @ self.lora_A.detach())",
             "return (self.lora_B.detach() @ self.lora_A.detach())",
             ("tests/test_patch_api.py::test_unpatch_merge_folds_the_update_and_restores_flags",
              "tests/nn/test_qlora.py::test_merge_into_4bit_dequantizes_merges_requantizes_and_warns",
              "tests/test_merging.py::test_merged_state_dict_of_a_patched_model_is_what_unpatch_merge_gives")),
    Mutation("dora merge drops the scale", "fastft/nn/dora.py",
             "full = weight + self.scale * (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))",
             "full = weight + (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))",
             ("tests/nn/test_dora_module.py::test_merge_folds_the_magnitude_and_direction_into_the_weight",
              "tests/nn/test_dora_module.py::test_qdora_merge_dequantizes_merges_requantizes_and_warns")),
    Mutation("dora row norm 10% too large (reference)", "fastft/ops/dora_row_norm.py",
             "return q.clamp_min(0.0).sqrt().clamp_min(eps)",
             "return (1.1 * q.clamp_min(0.0).sqrt()).clamp_min(eps)",
             ("tests/test_dora_peft.py::test_magnitude_starts_at_the_row_norms_so_dora_equals_lora_at_init",)),
    Mutation("dora dg off by 0.05% (kernel)", "kernels/dora.py",
             "tl.store(out_ptr + tl.program_id(1) * stride_split + offs_n, dot, mask=in_n)",
             "tl.store(out_ptr + tl.program_id(1) * stride_split + offs_n, dot * 1.0005, mask=in_n)",
             ("tests/kernels/test_dora_triton.py::test_backward_matches_reference[fp16-dense-bias-r16]",)),
    Mutation("dora row norm off by 0.05% (kernel)", "kernels/dora.py",
             "norm = tl.maximum(tl.sqrt(tl.maximum(q, 0.0)), tl.full((), eps, ACC_DTYPE))",
             "norm = tl.maximum(1.0005 * tl.sqrt(tl.maximum(q, 0.0)), tl.full((), eps, ACC_DTYPE))",
             ("tests/kernels/test_dora_triton.py::test_row_norm_matches_reference[fp16-nf4-nested]",)),
    Mutation("fused loss logsumexp off by 0.3% (kernel)", "kernels/linear_cross_entropy.py",
             "tl.store(lse_ptr + row, lse)",
             "tl.store(lse_ptr + row, lse * 1.003)",
             ("tests/kernels/test_chunk_loss_kernel.py::test_kernel_matches_reference_on_one_chunk",
              "tests/kernels/test_linear_cross_entropy_triton.py::test_fused_pass_matches_reference")),
    Mutation("fake-quant: 3 outputs one step off (rotated per-token path)", "kernels/fake_quantize.py",
             "keep=keep if need_mask else None)\n            return out, mask",
             "keep=keep if need_mask else None)\n"
             "            out.view(-1, out.shape[-1])[0, :3] += (out[0].amax() - out[0].amin()) / (2 ** bits - 1)\n"
             "            return out, mask",
             ("tests/kernels/test_qat_triton.py::test_random_inputs_close_to_reference",)),
    # --- the split paths a GPU takes --------------------------------------------------------------
    Mutation("split-K keeps only the first partial (lora kernel)", "kernels/lora.py",
             "out.copy_(target.sum(dim=0))", "out.copy_(target[0])",
             ("tests/kernels/test_lora_triton.py::test_lora_linear_autograd_triton_equals_torch[fp32-dense-split-k]",)),
    Mutation("dora pre-scale dot keeps only the first token split", "kernels/dora.py",
             "torch.sum(target, dim=0, out=dg)", "dg.copy_(target[0])",
             ("tests/kernels/test_dora_triton.py::test_backward_with_split_reductions_matches_reference[fp32-dense-bias]",)),
    Mutation("wrong reduction dtype: split partials in the output dtype (lora kernel)", "kernels/lora.py",
             "torch.empty((n_splits, I, J), dtype=partial_dtype, device=out.device)",
             "torch.empty((n_splits, I, J), dtype=out.dtype, device=out.device)",
             ("tests/kernels/test_lora_triton.py::test_lora_linear_autograd_triton_equals_torch[fp16-nf4-split-k]",)),
    # --- classic bugs ---------------------------------------------------------------------------------
    Mutation("dropped scale in the LoRA reference backward (dB)", "fastft/ops/lora.py",
             "dB = _scaled_mm(grad_y.t(), xa, scale) if need_dB", "dB = _scaled_mm(grad_y.t(), xa, 1.0) if need_dB",
             ("tests/ops/test_lora_reference.py",)),
    Mutation("transposed operand: the K-factor (Paley, not symmetric) used transposed (reference)",
             "fastft/ops/hadamard.py",
             "y = torch.matmul(HK.t() if inverse else HK, y)", "y = torch.matmul(HK if inverse else HK.t(), y)",
             ("tests/ops/test_hadamard_reference.py::test_matches_dense_matrix",)),
    Mutation("off-by-one mask: last column of the saved S²FT slice dropped (kernel)", "kernels/s2ft.py",
             "mask=in_m[:, None] & (offs_k[None, :] < S))", "mask=in_m[:, None] & (offs_k[None, :] < S - 1))",
             ("tests/kernels/test_s2ft_triton.py::test_op_through_the_triton_backend_against_the_float64_formula[cols-one-split]",)),
    Mutation("missing bias in the S²FT forward kernel", "kernels/s2ft.py",
             "HAS_BIAS=bias is not None,", "HAS_BIAS=False,",
             ("tests/kernels/test_s2ft_triton.py::test_op_through_the_triton_backend_against_the_float64_formula[cols-one-split]",)),
    Mutation("wrong reduction dtype: fused loss accumulates in the 16-bit input dtype (reference)",
             "fastft/ops/linear_cross_entropy.py",
             "return torch.float64 if dtype == torch.float64 else torch.float32",
             "return torch.float64 if dtype == torch.float64 else dtype",
             # test_linear_cross_entropy.py (the reference's own tests) lets this survive: no 16-bit case
             ("tests/kernels/test_linear_cross_entropy_triton.py::test_fused_pass_matches_reference[fp16-ce-smoothing]",)),
    Mutation("S²FT rows-mode gradient takes the wrong rows (reference)", "fastft/ops/s2ft_linear.py",
             "dw = grad_y[:, :width].t() @ saved if rows else grad_y.t() @ saved",
             "dw = grad_y[:, 1:width + 1].t() @ saved if rows else grad_y.t() @ saved",
             ("tests/ops/test_s2ft_linear.py",)),
]


def copy_repo(dest: Path) -> None:
    """fastft/ (+ kernels/ as fastft/kernels, csrc/ as fastft/csrc) under dest/src, tests/ and pyproject."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    # fastft/kernels is a link to kernels/ in a checkout: copy kernels/ itself (the copy's files are mutated)
    shutil.copytree(ROOT / "fastft", dest / "src" / "fastft",
                    ignore=lambda folder, names: set(ignore(folder, names)) | ({"kernels"} if Path(folder) == ROOT / "fastft" else set()))
    shutil.copytree(ROOT / "kernels", dest / "src" / "fastft" / "kernels", ignore=ignore)
    shutil.copytree(ROOT / "csrc", dest / "src" / "fastft" / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def copied_path(dest: Path, file: str) -> Path:
    if file.startswith("kernels/") or file.startswith("csrc/"):
        return dest / "src" / "fastft" / file
    if file.startswith("fastft/"):
        return dest / "src" / file
    return dest / file


def run_pytest(dest: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(dest / "src"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", "--no-header", *tests]
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def killing_test(output: str) -> str:
    match = re.search(r"^FAILED (\S+)", output, re.M)
    return match.group(1) if match else "?"


def check_imports_from_copy(dest: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(dest / "src"))
    code = "import fastft, fastft.kernels.lora as k; print(fastft.__file__); print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    paths = out.stdout.split()
    if not paths or not all(p.startswith(str(dest)) for p in paths):
        sys.exit(f"mutation_check: the copy's fastft is not the one imported: {paths}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run only the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests; run nothing")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test subset")
    parser.add_argument("--tests-at", metavar="REV", help="use tests/ as of git revision REV (to show which "
                        "mutations an older suite let survive); implies no baseline requirement")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in mutations:
            print(f"{m.name}\n    {m.file}\n    tests: {' '.join(m.tests)}")
        return 0
    # every snippet must be in the working tree's file exactly once (checked before anything runs)
    for m in mutations:
        count = (ROOT / m.file).read_text().count(m.snippet)
        if count != 1:
            sys.exit(f"mutation_check: {m.name!r}: the snippet occurs {count} times in {m.file} (want 1); "
                     f"update the mutation list.\n    snippet: {m.snippet}")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="fastft-mutation-") as tmp:
        dest = Path(tmp)
        copy_repo(dest)
        if args.tests_at:
            shutil.rmtree(dest / "tests")
            archive = subprocess.run(["git", "archive", args.tests_at, "tests"], cwd=ROOT, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        check_imports_from_copy(dest)
        subsets = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        code, output = (0, "") if args.tests_at else run_pytest(dest, subsets, args.timeout * 2)
        if code != 0:
            print(output[-4000:])
            sys.exit("mutation_check: the test subsets fail WITHOUT any mutation; fix them first")
        print(f"baseline: {len(subsets)} subsets pass unmutated ({time.time() - start:.0f}s)", flush=True)
        rows, survivors = [], []
        for m in mutations:
            path = copied_path(dest, m.file)
            original = path.read_text()
            path.write_text(original.replace(m.snippet, m.replacement))
            t0 = time.time()
            try:
                code, output = run_pytest(dest, m.tests, args.timeout)
            finally:
                path.write_text(original)
            print(f"  {m.name}: {'killed' if code == 1 else 'NOT killed'} ({time.time() - t0:.0f}s)", flush=True)
            if code == 1:
                rows.append((m.name, killing_test(output), time.time() - t0))
            else:
                why = {0: "SURVIVED (the tests passed)", -1: "timeout"}.get(code, f"pytest exit {code}")
                rows.append((m.name, why, time.time() - t0))
                survivors.append((m, output))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':<{width}}  killed by")
    print("-" * (width + 60))
    for name, test, seconds in rows:
        print(f"{name:<{width}}  {test}  ({seconds:.0f}s)")
    print(f"\n{len(rows) - len(survivors)}/{len(rows)} mutations killed in {time.time() - start:.0f}s")
    for m, output in survivors:
        print(f"\n=== {m.name} ({m.file})\n{output[-3000:]}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
