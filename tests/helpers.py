"""Shared test helpers: the one tolerance table, comparison, and tiny models built from config classes."""
from __future__ import annotations

import contextlib
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


def randomize_by_name(model, std: float = 0.3, magnitude_jitter: float = 0.0, seed: int = 3) -> None:
    """Every parameter named ``*lora_B*`` drawn from N(0, std²) (B starts at zero, which hides bugs); every
    ``*lora_magnitude*`` scaled by 1 + magnitude_jitter·U(0, 1) (DoRA's m starts at the row norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if "lora_magnitude" in name and magnitude_jitter:
                p.mul_(1 + magnitude_jitter * torch.rand(p.shape, generator=gen))


def assert_adapter_round_trips(model, base, x, directory, peft_export: bool = True, merge: bool = True):
    """What a patched ``model`` saves reloads into a copy of its unpatched ``base`` with the same logits on ``x``:
    ``fastft.save`` / ``fastft.load``; with ``peft_export``, ``fastft.export_peft`` loaded by PEFT's
    ``PeftModel.from_pretrained``; with ``merge``, the reloaded copy after ``fastft.unpatch(merge=True)``.
    Returns the reloaded copy."""
    import copy
    from pathlib import Path

    import fastft

    directory = Path(directory)
    fastft.save(model, directory / "ours")
    fresh = copy.deepcopy(base)
    fastft.load(fresh, directory / "ours")
    loaded = None
    if peft_export:
        import peft

        fastft.export_peft(model, directory / "peft")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory / "peft")
    with torch.no_grad():
        want = model(x).logits
        assert_close(fresh(x).logits, want, msg="fastft.load")
        if loaded is not None:
            assert_close(loaded(x).logits, want, msg="PEFT loading fastft.export_peft")
        if merge:
            fastft.unpatch(fresh, merge=True)
            assert_close(fresh(x).logits, want, msg="unpatch(merge=True) after fastft.load")
    return fresh


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


# ------------------------------------------------------------------ whole-model snapshot (error paths)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def model_snapshot(model: torch.nn.Module) -> dict:
    """Everything a refused call must leave as it was: every module's class and training flag, every
    parameter and buffer (bitwise, with dtype, device, requires_grad and identity of shared tensors), and
    every module hook (forward, pre-forward, backward, state-dict) with the function it calls."""
    modules = [(name, type(m), m.training) for name, m in model.named_modules(remove_duplicate=False)]
    tensors = {}
    for kind, items in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if t is None:
                continue
            tensors[name] = (kind, t.detach().clone(), t.dtype, t.device, t.requires_grad, id(t))
    hooks = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr in _HOOK_DICTS:
            table = getattr(m, attr, None) or {}
            if table:
                hooks[(name, attr)] = [(k, id(fn)) for k, fn in table.items()]
    config = getattr(model, "config", None)
    extra = (getattr(config, "_attn_implementation", None), getattr(config, "tie_word_embeddings", None)) \
        if config is not None else None
    return dict(modules=modules, tensors=tensors, hooks=hooks, config=extra)


def assert_model_unchanged(model: torch.nn.Module, before: dict) -> None:
    """``model`` is as :func:`model_snapshot` saw it (the check every error-path test ends with)."""
    after = model_snapshot(model)
    assert after["modules"] == before["modules"], "module classes, names or training flags changed"
    assert after["tensors"].keys() == before["tensors"].keys(), "the set of parameters/buffers changed"
    for name, (kind, value, dtype, device, flag, ident) in after["tensors"].items():
        kind0, value0, dtype0, device0, flag0, ident0 = before["tensors"][name]
        assert (kind, dtype, device, flag) == (kind0, dtype0, device0, flag0), name
        assert ident == ident0, f"{name} is another tensor object now"
        assert value.shape == value0.shape, name
        bits = (lambda t: t.reshape(-1).view(torch.uint8)) if value.dtype.is_floating_point else (lambda t: t)
        assert torch.equal(bits(value), bits(value0)), f"{name} changed (bitwise)"
    assert after["hooks"] == before["hooks"], "module hooks changed"
    assert after["config"] == before["config"], "attention implementation / tied embeddings changed"


# ------------------------------------------------------------------ merges written out
def written_out_merges(model, alpha: float, r: int) -> dict:
    """{``<module>.weight``: merged weight} for every fastft LoRA/DoRA module of a patched ``model``, written
    out here in float64 from its tensors and the config numbers ``alpha`` and ``r`` (never the module's own
    scale or merge code): ``W + (alpha/r)·B·A`` for LoRA, ``m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` (row norms) for
    DoRA. A 4-bit base is dequantized by bitsandbytes itself."""
    from fastft.nn import DoRALinear, LoRALinear

    s = alpha / r
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        base = module.base_layer
        if type(base).__name__ == "Linear4bit":
            import bitsandbytes as bnb

            W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
        else:
            W = base.weight.detach().double()
        full = W + s * module.lora_B.detach().double() @ module.lora_A.detach().double()
        if isinstance(module, DoRALinear):
            m = module.lora_magnitude_vector.detach().double()
            full = m[:, None] * full / full.pow(2).sum(1, keepdim=True).sqrt()
        out[f"{name}.weight"] = full
    return out


# ------------------------------------------------------------------ Triton launches under the interpreter
SPLIT_KERNEL_MODULES = ("lora", "s2ft", "dora")  # the fused loss has no split reduction (chunks, no atomics)


@contextlib.contextmanager
def interpreter_splits(n: int):
    """Force ``n`` reduction splits (split-K, token and vocabulary splits, DoRA's pre-scale dot) in every
    kernel module with the ``INTERPRETER_SPLITS`` hook: the path a GPU takes, run under the interpreter."""
    import importlib

    modules = [importlib.import_module(f"fastft.kernels.{name}") for name in SPLIT_KERNEL_MODULES]
    old = [m.INTERPRETER_SPLITS for m in modules]
    for m in modules:
        m.INTERPRETER_SPLITS = n
    try:
        yield
    finally:
        for m, value in zip(modules, old):
            m.INTERPRETER_SPLITS = value


class LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel (a module global launched as ``kernel[grid](...)``) and records
    each launch grid, so a test can assert that the kernel ran, and with how many splits."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def spy_on(monkeypatch, module, name: str) -> LaunchSpy:
    spy = LaunchSpy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


def training_losses(model, input_ids, steps: int = 6, lr: float = 1e-2) -> list[float]:
    """Losses of ``steps`` Adam steps of ``model`` (a causal LM, its own inputs as labels) on one batch."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def loaded_from_peft(base, peft_config, b_std: float):
    """(fastft model, PEFT model): PEFT's adapter of ``peft_config`` on a copy of ``base`` with lora_B drawn from
    N(0, b_std²), saved, and loaded into another copy of ``base`` by ``fastft.from_peft``."""
    import copy
    import tempfile

    import peft

    import fastft

    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=b_std)
    theirs.eval()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = copy.deepcopy(base)
        fastft.from_peft(ours, d)
    return ours, theirs


def assert_same_logits_and_input_grads(ours, theirs, base, ids) -> None:
    """Both causal LMs give the same logits on ``ids`` and the same gradient of mean(logits²) in their inputs."""
    x = base.get_input_embeddings()(ids).detach()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours(inputs_embeds=x1).logits, theirs(inputs_embeds=x2).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


def bench_context(quick: bool = True, compile: bool = False):
    """A CPU ``benchmarks.harness.Context`` with a fixed stand-in environment, for building a benchmark's subjects."""
    from benchmarks import harness, records

    return harness.Context(device=torch.device("cpu"), quick=quick, compile=compile,
                           env=records.Environment("cpu", 2, "t", "tr", "f", "run-1"))


def subjects_by_provider(subjects) -> dict:
    """provider -> its subject (a runnable one before a skipped one: fastft[triton] is skipped on a CPU)."""
    from benchmarks.harness import Skipped

    out = {}
    for s in subjects:
        if s.provider not in out or isinstance(out[s.provider], Skipped):
            out[s.provider] = s
    return out


def tiny_moe_model(family: str):
    """A small MoE causal LM with fused 3-D experts, in eval mode: qwen3_moe or mixtral."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=24, num_local_experts=4)).eval()
    raise ValueError(family)
