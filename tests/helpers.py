"""Shared test helpers: the one tolerance table, comparison, and tiny models built from config classes."""
from __future__ import annotations

import torch

from fastft.dispatch import use_backend as backend  # noqa: F401  (force FASTFT_BACKEND inside a block)

# One table, per dtype, for comparing an implementation with a reference evaluated at the same input
# precision (float64 entries: against an exact float64 evaluation of the formula).
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol, msg=lambda m: f"{msg}\n{m}" if msg else m)


def tiny_config(family: str):
    """A small config of a decoder family: llama, qwen2 (GQA, q/k/v biases), mistral, gemma."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)  # q/k/v carry biases
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    raise ValueError(family)


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A small CausalLM of ``family`` with random weights (nothing is downloaded), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
           "gemma": tf.GemmaForCausalLM}[family]
    model = cls(config).to(dtype)
    return model.eval()


def randomize_lora(model, seed: int = 1, std: float = 0.1) -> None:
    """Give every fastft LoRA module non-zero A and B (B starts at zero, which hides bugs)."""
    from fastft.nn import LoRALinear

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * std)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * std)


def quantize_linears(model, nested: bool = True, quant_type: str = "nf4", compute_dtype=torch.float32):
    """Replace every nn.Linear inside the decoder layers by a bitsandbytes Linear4bit of the same weight."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and ".layers." in f".{name}":
            q = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None,
                compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type,
            )
            q.load_state_dict(module.state_dict())
            q = q.to(module.weight.device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


def dequantized_copy(model):
    """A copy of ``model`` with every Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    import copy

    from fastft.bnb import four_bit_weight, is_linear4bit

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if is_linear4bit(module):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(four_bit_weight(module).dequantize(torch.float32))
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


class TokenData(torch.utils.data.Dataset):
    """``n`` random token sequences, each its own labels: a dataset for short transformers Trainer runs."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 96, seed: int = 0):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_losses(model, output_dir, steps: int = 8) -> list[float]:
    """Train ``model`` with transformers' Trainer on :class:`TokenData` (batch 4, lr 5e-3, CPU, fixed
    seeds) for ``steps`` steps; the logged loss of each step."""
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
