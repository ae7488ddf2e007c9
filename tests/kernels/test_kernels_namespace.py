"""Our top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers (>= 5.25) and bitsandbytes import Hugging Face's ``kernels`` distribution, and ``python -m ...``
from the repository root puts the root first on ``sys.path``. ``kernels/`` has no ``__init__.py``: it is only
a namespace portion, which Python returns for ``import kernels`` only if no regular package of that name is
found anywhere on ``sys.path``. fastft reaches the folder as ``fastft.kernels``: through the
``fastft/kernels`` link in a checkout (root or editable install), through the wheel's copy when installed.

Every check runs in a fresh interpreter started from the repository root, as a user's command would.
"""
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HF_KERNELS_INSTALLED = _distribution_installed("kernels")


def run_from(cwd: pathlib.Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_kernels_folder_is_a_namespace_portion_and_fastft_kernels_a_link_to_it():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels"
    link = ROOT / "fastft" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


@pytest.mark.skipif(not HF_KERNELS_INSTALLED, reason="Hugging Face's kernels package is not installed here "
                    "(transformers >= 5.25 requires it); nothing to be shadowed")
def test_import_kernels_from_the_root_is_hugging_faces_package():
    result = run_from(ROOT, "-c", "import kernels; print(kernels.__file__); from kernels import get_kernel")
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(result.stdout.strip()).parent != (ROOT / "kernels").resolve(), result.stdout


@pytest.mark.skipif(not HF_KERNELS_INSTALLED, reason="Hugging Face's kernels package is not installed here")
def test_transformers_hub_kernels_integration_imports_from_the_root():
    result = run_from(ROOT, "-c", "import transformers.integrations.hub_kernels")
    assert result.returncode == 0, result.stderr


def test_peft_and_bitsandbytes_import_from_the_root_as_from_elsewhere(tmp_path):
    """From the root, ``import peft, bitsandbytes`` prints exactly what it prints from a folder where our
    ``kernels/`` cannot be on the path. (What bitsandbytes says about kernels-community depends on the
    installed ``kernels`` and the hub being reachable, e.g. 'not in the local cache ... offline mode';
    our folder must change none of it.)"""
    pytest.importorskip("peft", reason="PEFT is a test dependency; install the test extra")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency; install the test extra")
    outputs = {}
    for where, cwd in (("root", ROOT), ("elsewhere", tmp_path)):
        result = run_from(cwd, "-c", "import peft, bitsandbytes")
        assert result.returncode == 0, result.stderr
        # glog-style prefixes (torch's C++ warnings) carry a time and a process id: drop them
        outputs[where] = re.sub(r"^[IWEF]\d{4} [\d:.]+ +\d+ ", "", result.stdout + result.stderr, flags=re.M)
    assert str(ROOT / "kernels") not in outputs["root"], outputs["root"]
    assert outputs["root"] == outputs["elsewhere"], outputs


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_fastft_kernels_import_from_the_root_and_from_elsewhere(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    code = ("import fastft.kernels.lora as lora, fastft.kernels as k; "
            "print(pathlib.Path(lora.__file__).resolve())")
    result = run_from(cwd, "-c", "import pathlib; " + code)
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(result.stdout.strip()) == (ROOT / "kernels" / "lora.py").resolve()


def test_wheel_installs_kernels_as_fastft_kernels_only(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fastft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("fastft/kernels/")) == kernel_files
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels package"


def _kernels_community_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if "kernels-community" in line}


def test_demo_runs_from_the_root(tmp_path):
    """The demo runs from the root; whatever it prints about kernels-community, bitsandbytes prints from a
    folder where our ``kernels/`` cannot be on the path too (its hub kernels, unreachable offline)."""
    pytest.importorskip("peft", reason="the demo compares with PEFT; install the test extra")
    result = run_from(ROOT, "-m", "fastft.demo", "--model", "tiny", "--quick")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    elsewhere = run_from(tmp_path, "-c", "import peft, bitsandbytes")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert str(ROOT / "kernels") not in result.stderr
    extra = _kernels_community_lines(result.stderr) - _kernels_community_lines(elsewhere.stdout + elsewhere.stderr)
    assert not extra, extra


def test_benchmarks_end_to_end_case_runs_from_the_root(tmp_path):
    pytest.importorskip("peft", reason="the end-to-end case compares with PEFT; install the test extra")
    result = run_from(ROOT, "-m", "benchmarks", "--quick", "--only", "e2e-lora", "--no-render", "--no-progress",
                      "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED" not in result.stdout
