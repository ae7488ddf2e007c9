"""Test setup: run Triton kernels on the CPU through the interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before any ``@triton.jit`` kernel is decorated, so it is set
here, before fastft (and fastft.kernels) is imported by any test module.
"""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fastft's C libraries (csrc/) are built once per test session into a temporary cache, never the user's.
_LIBRARY_CACHE = tempfile.mkdtemp(prefix="fastft-test-cache-")
os.environ["FASTFT_CACHE_DIR"] = _LIBRARY_CACHE
atexit.register(shutil.rmtree, _LIBRARY_CACHE, True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
