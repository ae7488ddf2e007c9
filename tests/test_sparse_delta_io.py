"""Sparse deltas as files: save, apply to a plain model, compose by addition, revert, and merge.

The patched models are built by hand (every linear of the decoder swapped for a SparseDeltaLinear with a
random support), so these tests need no planner.
"""
import copy

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import save_file

import fastft
from fastft.nn import SparseDeltaLinear
from fastft.sparse_delta_io import read_sparse_delta, sparse_delta_state


def swap_linears(model, density=0.05, seed=0, names=("q_proj", "v_proj", "down_proj")):
    """Swap the named linears of every layer for SparseDeltaLinear with random supports and values."""
    gen = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in names and isinstance(module, torch.nn.Linear):
            size = module.weight.numel()
            k = max(1, int(density * size))
            idx = torch.randperm(size, generator=gen)[:k].sort().values
            values = torch.randn(k, generator=gen, dtype=module.weight.dtype) * 0.05
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SparseDeltaLinear(module, idx, values))
    return model


def ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def test_save_then_apply_to_a_plain_model_gives_the_patched_logits(tmp_path):
    plain = tiny_model("llama")
    patched = swap_linears(copy.deepcopy(plain))
    path = tmp_path / "task.safetensors"
    fastft.save_sparse_delta(patched, path)
    stored = read_sparse_delta(path)
    assert set(stored) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                           ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert stored["model.layers.0.self_attn.q_proj"]["shape"].tolist() == [64, 64]
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    changed = fastft.apply_sparse_delta(plain, path)
    assert changed == sorted(stored)
    torch.testing.assert_close(logits(plain), logits(patched), atol=1e-5, rtol=1e-5)
    fastft.revert_sparse_delta(plain, path)
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param, before[name], atol=1e-7, rtol=0, msg=name)


def test_two_deltas_compose_by_addition(tmp_path):
    plain = tiny_model("llama")
    lang = swap_linears(copy.deepcopy(plain), seed=1)
    task = swap_linears(copy.deepcopy(plain), seed=2, names=("q_proj", "o_proj"))  # overlaps on q_proj
    fastft.save_sparse_delta(lang, tmp_path / "lang.safetensors")
    fastft.save_sparse_delta(task, tmp_path / "task.safetensors")
    want = copy.deepcopy(plain)
    with torch.no_grad():
        for model in (lang, task):
            for name, module in model.named_modules():
                if isinstance(module, SparseDeltaLinear):
                    want.get_submodule(name).weight += module.delta_weight()
    sequential = copy.deepcopy(plain)
    fastft.apply_sparse_delta(sequential, tmp_path / "lang.safetensors")
    fastft.apply_sparse_delta(sequential, tmp_path / "task.safetensors")
    for (name, got), (_, expected) in zip(sequential.named_parameters(), want.named_parameters()):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=0, msg=name)
    merged = fastft.merge(plain, [str(tmp_path / "lang.safetensors"), str(tmp_path / "task.safetensors")],
                          method="task_arithmetic")
    for name, value in want.state_dict().items():
        torch.testing.assert_close(merged[name], value, atol=1e-7, rtol=0, msg=name)
    half = fastft.merge(plain.state_dict(), [str(tmp_path / "task.safetensors")], method="task_arithmetic", scale=0.5)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(half[q], plain.state_dict()[q] + 0.5 * task.get_submodule(q[:-7]).delta_weight())


def test_apply_under_a_patched_model_goes_into_the_frozen_base(tmp_path):
    plain = tiny_model("llama")
    lang = swap_linears(copy.deepcopy(plain), seed=1)
    fastft.save_sparse_delta(lang, tmp_path / "lang.safetensors")
    training = swap_linears(copy.deepcopy(plain), seed=5)  # a task delta being trained on the same layers
    layer = training.model.layers[0].self_attn.q_proj
    values = layer.delta_values.detach().clone()
    fastft.apply_sparse_delta(training, tmp_path / "lang.safetensors")
    assert torch.equal(layer.delta_values.detach(), values)
    torch.testing.assert_close(layer.base_layer.weight, plain.model.layers[0].self_attn.q_proj.weight
                               + lang.model.layers[0].self_attn.q_proj.delta_weight())


def test_value_transform_is_saved_as_effective_values(tmp_path):
    model = swap_linears(tiny_model("llama"), names=("q_proj",))
    layer = model.model.layers[0].self_attn.q_proj
    layer.value_transform = torch.nn.Identity()
    layer.value_transform.forward = lambda v: v * 0  # a gate that closed every value
    state = sparse_delta_state(model)
    assert torch.count_nonzero(state["model.layers.0.self_attn.q_proj.delta_values"]) == 0
    assert torch.count_nonzero(state["model.layers.1.self_attn.q_proj.delta_values"]) > 0


def test_conv1d_models_use_the_out_in_view(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config).eval()
    patched = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(0)
    for name, module in list(patched.named_modules()):
        if name.endswith("attn.c_attn"):
            idx = torch.randperm(module.weight.numel(), generator=gen)[:50].sort().values
            parent, _, child = name.rpartition(".")
            setattr(patched.get_submodule(parent), child, SparseDeltaLinear(module, idx, torch.randn(50, generator=gen)))
    fastft.save_sparse_delta(patched, tmp_path / "gpt2.safetensors")
    merged = fastft.merge(plain, [str(tmp_path / "gpt2.safetensors")], method="task_arithmetic")
    fastft.apply_sparse_delta(plain, tmp_path / "gpt2.safetensors")
    torch.testing.assert_close(logits(plain), logits(patched), atol=1e-5, rtol=1e-5)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0, msg=name)


def test_bad_files_and_models_change_nothing(tmp_path):
    plain = tiny_model("llama")
    patched = swap_linears(copy.deepcopy(plain))
    path = tmp_path / "d.safetensors"
    fastft.save_sparse_delta(patched, path)
    tensors = read_sparse_delta(path)
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}

    def write(mutate, name):
        flat = {f"{m}.{f}": t.clone() for m, e in tensors.items() for f, t in e.items()}
        mutate(flat)
        out = tmp_path / name
        save_file(flat, str(out), metadata={"format": "fastft-sparse-delta"})
        return out

    last = "model.layers.1.mlp.down_proj"  # applied last: a failure there must leave the first modules untouched
    cases = [
        (write(lambda f: f.__setitem__(f"{last}.shape", torch.tensor([88, 65])), "shape.st"), "saved from another model size"),
        (write(lambda f: f.__setitem__(f"{last}.delta_values", f[f"{last}.delta_values"] * float("nan")), "nan.st"), "NaN"),
        (write(lambda f: f.__setitem__(f"{last}.delta_indices", f[f"{last}.delta_indices"].flip(0)), "order.st"), "sorted"),
        (write(lambda f: f.__setitem__("model.layers.9.mlp.up_proj.delta_indices", torch.tensor([1])) or
               f.update({"model.layers.9.mlp.up_proj.delta_values": torch.ones(1),
                         "model.layers.9.mlp.up_proj.shape": torch.tensor([4, 4])}), "missing.st"), "has not"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            fastft.apply_sparse_delta(plain, bad)
    save_file({"x": torch.ones(1)}, str(tmp_path / "other.st"))
    with pytest.raises(ValueError, match="not a sparse-delta file"):
        fastft.apply_sparse_delta(plain, tmp_path / "other.st")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastft.apply_sparse_delta(plain, path, scale=float("inf"))
    with pytest.raises(FileNotFoundError):
        fastft.apply_sparse_delta(plain, tmp_path / "absent.st")
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        fastft.save_sparse_delta(plain, tmp_path / "empty.st")
    for name, param in plain.named_parameters():
        assert torch.equal(param, before[name]), name


def test_a_4bit_base_is_refused(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes")
    dense = torch.nn.Linear(64, 32)
    layer = SparseDeltaLinear(dense, torch.tensor([0, 5]), torch.ones(2))
    holder = torch.nn.Sequential(layer)
    fastft.save_sparse_delta(holder, tmp_path / "d.st")
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)
    q.load_state_dict(dense.state_dict())
    with pytest.raises(ValueError, match="4-bit"):
        fastft.apply_sparse_delta(torch.nn.Sequential(q.to("cpu")), tmp_path / "d.st")
