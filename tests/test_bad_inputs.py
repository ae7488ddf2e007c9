"""Bad and edge inputs at every public entry point: a clear error (its type and a message naming the problem)
raised before anything changes: a deep snapshot of the model (module classes, every parameter and buffer bit
for bit, requires_grad flags, hooks, the patch state) is the same after the failed call.

Each case is ``(id, setup, call, error, match)``: ``setup(tmp)`` returns the model (plain or patched) and
anything the call needs; ``call(model, ctx)`` must raise ``error`` with a message matching ``match``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import fastft
from fastft.ops import dora_linear, fake_quantize, hadamard_transform, linear_cross_entropy, lora_linear, s2ft_linear
from model_snapshot import assert_unchanged, snapshot

NAN, INF = float("nan"), float("inf")


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def wider(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def patched(config=None, seed: int = 0):
    model = tiny(seed)
    fastft.patch(model, config or fastft.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def saved_dir(tmp: pathlib.Path, config=None, name="saved") -> str:
    path = tmp / name
    fastft.save(patched(config, seed=1), path)
    return str(path)


def peft_dir(tmp: pathlib.Path, name="peft") -> str:
    path = tmp / name
    fastft.export_peft(patched(seed=1), path)
    return str(path)


def edit_weights(directory: str, fn, file="fastft_adapter.safetensors") -> str:
    path = os.path.join(directory, file)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
    return directory


def edit_json(directory: str, fn, file="fastft_config.json") -> str:
    path = os.path.join(directory, file)
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return directory


def write_bytes(directory: str, file: str, data: bytes) -> str:
    with open(os.path.join(directory, file), "wb") as f:
        f.write(data)
    return directory


def truncate(directory: str, file: str) -> str:
    path = os.path.join(directory, file)
    data = open(path, "rb").read()
    return write_bytes(directory, file, data[: len(data) // 2])


def first_key(tensors, part="lora_A"):
    return next(k for k in sorted(tensors) if k.endswith(part) or k.endswith(part + ".weight"))


def _shape_of(t, key, shape):
    t[key] = torch.zeros(shape)


def _lce_args(n=6, vocab=16, hidden=8):
    torch.manual_seed(0)
    return torch.randn(n, hidden), torch.randn(vocab, hidden), torch.randint(0, vocab, (n,))


CAUSAL = dict(input_ids=torch.randint(0, 64, (2, 6)))
ALL_IGNORED = dict(input_ids=torch.randint(0, 64, (2, 6)), labels=torch.full((2, 6), -100))


def plain(tmp):
    return tiny(), None


def with_lora(tmp):
    return patched(), None


def with_loss(tmp):
    model = tiny()
    fastft.patch(model, fastft.LossConfig())
    return model, None


def with_s2ft(tmp):
    model = tiny()
    fastft.patch(model, fastft.S2FTConfig(ffn_ratio=0.25))
    return model, None


def plain_and(make):
    return lambda tmp: (tiny(), make(tmp))


def patched_and(make):
    return lambda tmp: (patched(), make(tmp))


L = fastft.LoRAConfig
CASES = [
    # ------------------------------------------------------------------ patch: LoRAConfig
    ("lora-alpha-inf", plain, lambda m, c: fastft.patch(m, L(alpha=INF)), ValueError, "alpha=inf.*finite"),
    ("lora-alpha-nan", plain, lambda m, c: fastft.patch(m, L(alpha=NAN)), ValueError, "alpha=nan"),
    ("lora-alpha-neg", plain, lambda m, c: fastft.patch(m, L(alpha=-1)), ValueError, "alpha=-1"),
    ("lora-alpha-str", plain, lambda m, c: fastft.patch(m, L(alpha="16")), TypeError, "alpha='16'.*not a str"),
    ("lora-alpha-bool", plain, lambda m, c: fastft.patch(m, L(alpha=True)), TypeError, "alpha=True"),
    ("lora-r-zero", plain, lambda m, c: fastft.patch(m, L(r=0)), ValueError, "rank must be a positive integer"),
    ("lora-r-float", plain, lambda m, c: fastft.patch(m, L(r=4.0)), TypeError, r"r=4\.0.*integer"),
    ("lora-r-bool", plain, lambda m, c: fastft.patch(m, L(r=True)), TypeError, "r=True"),
    ("lora-r-too-big-pissa", plain, lambda m, c: fastft.patch(m, L(r=64, init="pissa")), ValueError, "r <= min"),
    ("lora-dropout-one", plain, lambda m, c: fastft.patch(m, L(dropout=1.0)), ValueError, r"dropout=1\.0"),
    ("lora-dropout-nan", plain, lambda m, c: fastft.patch(m, L(dropout=NAN)), ValueError, "dropout=nan"),
    ("lora-rslora-int", plain, lambda m, c: fastft.patch(m, L(rslora=1)), TypeError, "rslora=1.*bool"),
    ("lora-dora-str", plain, lambda m, c: fastft.patch(m, L(dora="yes")), TypeError, "dora='yes'"),
    ("lora-train_a-none", plain, lambda m, c: fastft.patch(m, L(train_a=None)), TypeError, "train_a=None"),
    ("lora-init-unknown", plain, lambda m, c: fastft.patch(m, L(init="loftq")), ValueError, "choose one of"),
    ("lora-peft-lora_alpha", plain, lambda m, c: fastft.patch(m, L(lora_alpha=8)), TypeError, "lora_alpha= is alpha="),
    ("lora-peft-target_modules", plain, lambda m, c: fastft.patch(m, L(target_modules=["q_proj"])), TypeError,
     "target_modules= is targets="),
    ("lora-targets-nothing", plain, lambda m, c: fastft.patch(m, L(targets=["no_such_proj"])), ValueError, "no_such_proj"),
    ("lora-targets-regex", plain, lambda m, c: fastft.patch(m, L(targets="q_proj(")), ValueError, "regular expression"),
    ("lora-layers-out-of-range", plain, lambda m, c: fastft.patch(m, L(layers=[7])), ValueError, "7"),
    ("lora-pissa-nan-weight", lambda tmp: (_nan_in_layer1(tiny()), None),
     lambda m, c: fastft.patch(m, L(r=4, init="pissa")), ValueError, "NaN or inf"),
    ("patch-twice", with_lora, lambda m, c: fastft.patch(m, L(r=2)), ValueError, "already patched"),
    ("patch-not-a-module", plain, lambda m, c: fastft.patch({"w": 1}, L()), TypeError, "torch.nn.Module"),
    ("patch-not-a-config", plain, lambda m, c: fastft.patch(m, {"r": 4}), TypeError, "not a fastft config"),
    ("patch-empty-list", plain, lambda m, c: fastft.patch(m, []), ValueError, "at least one config"),
    ("patch-same-method-twice", plain, lambda m, c: fastft.patch(m, [L(r=2), L(r=4)]), ValueError, "one config per method"),
    # ------------------------------------------------------------------ patch: QATConfig
    ("qat-w_bits-9", plain, lambda m, c: fastft.patch(m, fastft.QATConfig(w_bits=9)), ValueError, "w_bits=9"),
    ("qat-clip-nan", plain, lambda m, c: fastft.patch(m, fastft.QATConfig(clip_ratio=NAN)), ValueError, "clip_ratio=nan"),
    ("qat-symmetric-int", plain, lambda m, c: fastft.patch(m, fastft.QATConfig(symmetric=0)), TypeError, "symmetric=0"),
    ("qat-group-not-dividing", plain,
     lambda m, c: fastft.patch(m, fastft.QATConfig(w_granularity="group", group_size=7, rotations=())), ValueError, "7"),
    ("qat-seed-float", plain, lambda m, c: fastft.patch(m, fastft.QATConfig(seed=1.5)), ValueError, "seed=1.5"),
    # ------------------------------------------------------------------ patch: LossConfig
    ("loss-z-inf", plain, lambda m, c: fastft.patch(m, fastft.LossConfig(z_loss=INF)), ValueError, "z_loss=inf"),
    ("loss-z-neg", plain, lambda m, c: fastft.patch(m, fastft.LossConfig(z_loss=-1e-4)), ValueError, "z_loss"),
    ("loss-smoothing-nan", plain, lambda m, c: fastft.patch(m, fastft.LossConfig(label_smoothing=NAN)), ValueError,
     "label_smoothing=nan"),
    ("loss-softcap-inf", plain, lambda m, c: fastft.patch(m, fastft.LossConfig(logit_softcap=INF)), ValueError,
     "logit_softcap=inf"),
    ("loss-kind-unknown", plain, lambda m, c: fastft.patch(m, fastft.LossConfig(kind="focal")), ValueError, "choose one of"),
    ("loss-chunk-zero", plain, lambda m, c: fastft.patch(m, fastft.LossConfig(chunk_size=0)), ValueError, "chunk_size=0"),
    # ------------------------------------------------------------------ patch: S2FTConfig
    ("s2ft-ratio-nan", plain, lambda m, c: fastft.patch(m, fastft.S2FTConfig(ffn_ratio=NAN)), ValueError, "ffn_ratio=nan"),
    ("s2ft-ratio-2", plain, lambda m, c: fastft.patch(m, fastft.S2FTConfig(ffn_ratio=2.0)), ValueError, "ffn_ratio=2.0"),
    ("s2ft-rows-int", plain, lambda m, c: fastft.patch(m, fastft.S2FTConfig(rows=1)), TypeError, "rows=1"),
    ("s2ft-gradient-all-ignored", plain,
     lambda m, c: fastft.patch(m, fastft.S2FTConfig(selection="gradient", calib=ALL_IGNORED)), ValueError,
     "loss is nan.*real targets"),
    ("s2ft-target-unknown", plain, lambda m, c: fastft.patch(m, fastft.S2FTConfig(targets=["q_proj"])), ValueError,
     "not an S²FT target"),
    # ------------------------------------------------------------------ unpatch
    ("unpatch-merge-str", with_lora, lambda m, c: fastft.unpatch(m, merge="no"), TypeError, "merge='no'.*bool"),
    ("unpatch-merge-int", with_lora, lambda m, c: fastft.unpatch(m, merge=0), TypeError, "merge=0"),
    ("unpatch-plain", plain, lambda m, c: fastft.unpatch(m), ValueError, "not patched"),
    # ------------------------------------------------------------------ save / export_peft
    ("save-plain", plain, lambda m, c: fastft.save(m, "/nonexistent/x"), ValueError, "not patched"),
    ("export-peft-s2ft", with_s2ft, lambda m, c: fastft.export_peft(m, "/nonexistent/x"), ValueError,
     r"fastft\.save.*unpatch\(model, merge=True\)"),
    ("export-peft-plain", plain, lambda m, c: fastft.export_peft(m, "/nonexistent/x"), ValueError, "not patched"),
    # ------------------------------------------------------------------ load
    ("load-missing-dir", plain, lambda m, c: fastft.load(m, "/nonexistent/adapter"), FileNotFoundError,
     "fastft_config.json is missing"),
    ("load-truncated-safetensors", plain_and(lambda tmp: truncate(saved_dir(tmp), "fastft_adapter.safetensors")),
     lambda m, c: fastft.load(m, c), ValueError, "fastft_adapter.safetensors.*truncated or corrupted"),
    ("load-garbage-safetensors", plain_and(lambda tmp: write_bytes(saved_dir(tmp), "fastft_adapter.safetensors", b"\x00" * 40)),
     lambda m, c: fastft.load(m, c), ValueError, "cannot read .*fastft_adapter.safetensors"),
    ("load-config-not-json", plain_and(lambda tmp: write_bytes(saved_dir(tmp), "fastft_config.json", b"{not json")),
     lambda m, c: fastft.load(m, c), ValueError, "fastft_config.json is not valid JSON"),
    ("load-config-missing-key", plain_and(lambda tmp: edit_json(saved_dir(tmp), lambda d: d.pop("modules"))),
     lambda m, c: fastft.load(m, c), ValueError, "fastft_config.json has no 'modules'"),
    ("load-config-bad-value", plain_and(lambda tmp: edit_json(saved_dir(tmp), lambda d: d["configs"][0].update(alpha="x"))),
     lambda m, c: fastft.load(m, c), ValueError, "fastft_config.json holds a config.*alpha"),
    ("load-unknown-tensor", plain_and(lambda tmp: edit_weights(saved_dir(tmp),
                                                               lambda t: t.update({"model.nope.lora_A": torch.zeros(1)}))),
     lambda m, c: fastft.load(m, c), ValueError, "no place: \\['model.nope.lora_A'\\]"),
    ("load-missing-tensor", plain_and(lambda tmp: edit_weights(saved_dir(tmp), lambda t: t.pop(first_key(t, "lora_B")))),
     lambda m, c: fastft.load(m, c), ValueError, "lacks 1 tensor.*lora_B"),
    ("load-wrong-shape", plain_and(lambda tmp: edit_weights(saved_dir(tmp), lambda t: _shape_of(t, first_key(t), (4, 96)))),
     lambda m, c: fastft.load(m, c), ValueError, r"module 'model\.layers\.0\.self_attn\.q_proj'.*\(4, 96\).*another base model"),
    ("load-nan-tensor", plain_and(lambda tmp: edit_weights(saved_dir(tmp), lambda t: t[first_key(t, "lora_B")].fill_(NAN))),
     lambda m, c: fastft.load(m, c), ValueError, "holds NaN or inf"),
    ("load-patched-wrong-shape", patched_and(lambda tmp: edit_weights(
        saved_dir(tmp), lambda t: _shape_of(t, sorted(k for k in t if k.endswith("lora_B"))[-1], (16, 5)))),
     lambda m, c: fastft.load(m, c), ValueError, r"layers\.1\.self_attn\.v_proj.*\(16, 5\)"),
    ("load-patched-unknown", patched_and(lambda tmp: edit_weights(saved_dir(tmp), lambda t: t.update(extra=torch.ones(2)))),
     lambda m, c: fastft.load(m, c), ValueError, "no place: \\['extra'\\]"),
    ("load-patched-other-config", patched_and(lambda tmp: saved_dir(tmp, fastft.LoRAConfig(r=2, targets=["q_proj", "v_proj"]))),
     lambda m, c: fastft.load(m, c), ValueError, "unpatch it first"),
    ("load-other-base-model", lambda tmp: (wider(), saved_dir(tmp)), lambda m, c: fastft.load(m, c), ValueError,
     "another base model"),
    # ------------------------------------------------------------------ from_peft
    ("from-peft-pickle-only", plain_and(lambda tmp: _pickle_only(peft_dir(tmp))), lambda m, c: fastft.from_peft(m, c),
     ValueError, r"only adapter_model\.bin, a pickle.*safe_serialization=True"),
    ("from-peft-truncated", plain_and(lambda tmp: truncate(peft_dir(tmp), "adapter_model.safetensors")),
     lambda m, c: fastft.from_peft(m, c), ValueError, "adapter_model.safetensors.*truncated or corrupted"),
    ("from-peft-config-not-json", plain_and(lambda tmp: write_bytes(peft_dir(tmp), "adapter_config.json", b"[1,")),
     lambda m, c: fastft.from_peft(m, c), ValueError, "adapter_config.json is not valid JSON"),
    ("from-peft-alpha-inf", plain_and(lambda tmp: edit_json(peft_dir(tmp), lambda d: d.update(lora_alpha=INF),
                                                            "adapter_config.json")),
     lambda m, c: fastft.from_peft(m, c), ValueError, "adapter_config.json holds a value.*alpha=inf"),
    ("from-peft-unknown-module", plain_and(lambda tmp: edit_weights(peft_dir(tmp), lambda t: t.update({
        "base_model.model.model.nope.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.model.nope.lora_B.weight": torch.zeros(32, 4)}), "adapter_model.safetensors")),
     lambda m, c: fastft.from_peft(m, c), ValueError, r"does not have: \['model\.nope'\]"),
    ("from-peft-wrong-shape", plain_and(lambda tmp: edit_weights(peft_dir(tmp), lambda t: _shape_of(
        t, sorted(k for k in t if k.endswith("lora_B.weight"))[-1], (16, 5)), "adapter_model.safetensors")),
     lambda m, c: fastft.from_peft(m, c), ValueError, r"v_proj.*\(16, 5\)"),
    ("from-peft-nan", plain_and(lambda tmp: edit_weights(peft_dir(tmp), lambda t: t[first_key(t, "lora_A")].fill_(INF),
                                                         "adapter_model.safetensors")),
     lambda m, c: fastft.from_peft(m, c), ValueError, "NaN or inf"),
    ("from-peft-missing", plain, lambda m, c: fastft.from_peft(m, "/nonexistent/peft"), FileNotFoundError,
     "adapter_config.json is missing"),
    # ------------------------------------------------------------------ select_trainable
    ("select-unknown-policy", with_lora, lambda m, c: fastft.select_trainable(m, "best"), ValueError, "unknown policy"),
    ("select-budget-nan", with_lora, lambda m, c: fastft.select_trainable(m, "flops", budget=NAN), ValueError, "budget"),
    ("select-seed-float", with_lora, lambda m, c: fastft.select_trainable(m, "half", seed=0.5), ValueError, "seed=0.5"),
    ("select-flops-nan-probe", with_lora,
     lambda m, c: fastft.select_trainable(m, "flops", budget=0.5, batch=ALL_IGNORED), ValueError, "probe loss is nan"),
    ("select-unknown-option", with_lora, lambda m, c: fastft.select_trainable(m, "half", lr=1), TypeError, "no argument"),
    # ------------------------------------------------------------------ merge
    ("merge-scale-nan", plain, lambda m, c: fastft.merge(m.state_dict(), [m.state_dict()], "task_arithmetic", scale=NAN),
     ValueError, "scale=nan"),
    ("merge-scale-str", plain, lambda m, c: fastft.merge(m.state_dict(), [m.state_dict()], "task_arithmetic", scale="1"),
     TypeError, "scale='1'"),
    ("merge-scale-list-inf", plain,
     lambda m, c: fastft.merge(m.state_dict(), [m.state_dict()] * 2, "task_arithmetic", scale=[1.0, INF]),
     ValueError, r"scale\[1\]=inf"),
    ("merge-lines-alpha-inf", plain, lambda m, c: fastft.merge(m.state_dict(), [m.state_dict()], "lines", alpha=INF, beta=0.5),
     ValueError, "alpha=inf"),
    ("merge-lines-beta-nan", plain, lambda m, c: fastft.merge(m.state_dict(), [m.state_dict()], "lines", alpha=1.0, beta=NAN),
     ValueError, "beta=nan"),
    ("merge-overflow", plain, lambda m, c: fastft.merge(m.state_dict(), [_shifted(m)], "task_arithmetic", scale=1e308),
     ValueError, "NaN or inf from finite inputs"),
    ("merge-pickle-adapter", plain_and(lambda tmp: _pickle_only(peft_dir(tmp))),
     lambda m, c: fastft.merge(m, [c], "task_arithmetic"), ValueError, "pickle"),
    ("merge-unknown-method", plain, lambda m, c: fastft.merge(m.state_dict(), [m.state_dict()], "ties"), ValueError,
     "choose one of"),
    # ------------------------------------------------------------------ fused loss (patched model and op)
    ("loss-num-items-nan", with_loss,
     lambda m, c: m(**CAUSAL, labels=CAUSAL["input_ids"], num_items_in_batch=torch.tensor(NAN)), ValueError,
     "num_items_in_batch=nan"),
    ("loss-num-items-zero", with_loss,
     lambda m, c: m(**CAUSAL, labels=CAUSAL["input_ids"], num_items_in_batch=torch.tensor(0)), ValueError,
     "num_items_in_batch=0"),
    ("loss-num-items-negative", with_loss,
     lambda m, c: m(**CAUSAL, labels=CAUSAL["input_ids"], num_items_in_batch=-3), ValueError, "num_items_in_batch=-3"),
    ("op-lce-num-items-inf", plain, lambda m, c: linear_cross_entropy(*_lce_args(), num_items_in_batch=INF),
     ValueError, "num_items_in_batch=inf"),
    ("op-lce-num-items-bool", plain, lambda m, c: linear_cross_entropy(*_lce_args(), num_items_in_batch=True),
     TypeError, "num_items_in_batch=True"),
    ("op-lce-z-loss-nan", plain, lambda m, c: linear_cross_entropy(*_lce_args(), z_loss=NAN), ValueError, "z_loss"),
    ("op-lce-label-out-of-vocab", plain,
     lambda m, c: linear_cross_entropy(_lce_args()[0], _lce_args()[1], torch.full((6,), 99)), ValueError, "vocab"),
    # ------------------------------------------------------------------ ops
    ("op-lora-scale-nan", plain, lambda m, c: lora_linear(*_lora_args(), scale=NAN), ValueError, "scale=nan"),
    ("op-lora-scale-inf", plain, lambda m, c: lora_linear(*_lora_args(), scale=INF), ValueError, "scale=inf"),
    ("op-lora-dropout-1", plain, lambda m, c: lora_linear(*_lora_args(), scale=1.0, dropout_p=1.0), ValueError, "dropout_p"),
    ("op-lora-B-shape", plain, lambda m, c: lora_linear(*_lora_args(b_shape=(5, 4)), scale=1.0), ValueError,
     "lora_B.*6×r"),
    ("op-lora-input-width", plain, lambda m, c: lora_linear(torch.randn(3, 9), *_lora_args()[1:], scale=1.0), ValueError,
     "last dimension is 9"),
    ("op-dora-scale-inf", plain, lambda m, c: dora_linear(*_lora_args(), torch.ones(6), scale=INF), ValueError, "scale=inf"),
    ("op-fake-quantize-bits", plain, lambda m, c: fake_quantize(torch.randn(2, 8), bits=1), ValueError, "bits"),
    ("op-hadamard-size", plain, lambda m, c: hadamard_transform(torch.randn(2, 7)), ValueError, "7"),
    ("op-s2ft-slice-shape", plain,
     lambda m, c: s2ft_linear(torch.randn(2, 8), torch.randn(6, 8), None, torch.randn(6, 9)), ValueError, "weight_slice \\(6, 9\\)"),
]


def _lora_args(b_shape=(6, 4)):
    torch.manual_seed(0)
    return torch.randn(3, 8), torch.randn(6, 8), None, torch.randn(4, 8), torch.randn(*b_shape)


def _nan_in_layer1(model):
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = NAN
    return model


def _shifted(model):
    return {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _pickle_only(directory: str) -> str:
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    write_bytes(directory, "adapter_model.bin", b"\x80\x04not really a pickle")
    return directory


def test_at_least_sixty_cases():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case, tmp_path):
    _, setup, call, error, match = case
    model, ctx = setup(tmp_path)
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        call(model, ctx)
    assert str(info.value), "the error carries a message"
    assert_unchanged(model, before)


def test_no_torch_load_in_the_package():
    """Adapters are read with safetensors only: nothing in fastft (or its kernels) unpickles."""
    root = pathlib.Path(fastft.__file__).parent
    sources = list(root.rglob("*.py")) + list((root.parent / "kernels").rglob("*.py"))
    offenders = [str(p) for p in sources if re.search(r"torch\s*\.\s*load\s*\(|pickle\.load|weights_only", p.read_text())]
    assert not offenders, offenders


def test_pissa_failure_part_way_leaves_earlier_layers_untouched():
    """A NaN in the last targeted layer: PiSSA's SVDs run before any base weight is rewritten."""
    model = _nan_in_layer1(tiny())
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf") as info:
        fastft.patch(model, fastft.LoRAConfig(r=4, init="pissa", targets=["q_proj"]))
    assert any("model.layers.1.self_attn.q_proj" in note for note in getattr(info.value, "__notes__", []))
    assert_unchanged(model, before)


def test_good_inputs_still_work(tmp_path):
    """The checks refuse only what is wrong: edge values that are right still pass and give finite results."""
    model = tiny()
    fastft.patch(model, fastft.LoRAConfig(r=1, alpha=1e-3, dropout=0.0, targets=["q_proj"]))
    out = model(**CAUSAL).logits
    assert torch.isfinite(out).all()
    fastft.save(model, tmp_path / "a")
    fastft.load(model, tmp_path / "a")
    fastft.unpatch(model, merge=False)
    h, w, y = _lce_args()
    assert math.isfinite(float(linear_cross_entropy(h, w, torch.full_like(y, -100), num_items_in_batch=0)))
    assert math.isfinite(float(linear_cross_entropy(h, w, y, num_items_in_batch=torch.tensor(100))))
