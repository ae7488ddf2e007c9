"""QAT on whole models: rotation folding, QuantLinear's STE, adaptive rotations, QAT+LoRA, export/load,
bad input, unpatch.

The models are the tiny ones of ``helpers.tiny_config`` with ``intermediate_size=96`` (= 12·8, a Hadamard
size with a Paley K-factor; the bad-input test uses 92 = 23·4, which has none), random norm scales (one
entry zero where a test says so) and biases, so that folding the norms and rotating the biases is exercised.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers as tf
from helpers import assert_close, assert_model_unchanged, model_snapshot, randomize_lora, tiny_config

import fastft
from fastft.plans.qat import plan_qat
from fastft.nn import LoRALinear, QuantLinear
from fastft.nn.qat_attention import SETTINGS_ATTR
from fastft.ops import fake_quantize, hadamard_matrix, hadamard_transform
from fastft.ops.fake_quantize import qrange
from fastft.patch import patch_state
from fastft.plans.qat_rotations import Rotation

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]
CLASSES = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
           "gemma": tf.GemmaForCausalLM}


def config_of(family: str, intermediate: int = 96):
    config = tiny_config(family)
    config.intermediate_size = intermediate
    return config


def model_of(family: str, dtype=torch.float64, intermediate: int = 96, seed: int = 0, zero_scale: bool = False):
    torch.manual_seed(seed)
    model = CLASSES[family](config_of(family, intermediate)).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # scales around 1 ((1 + w) for Gemma), with zero_scale one exactly zero
                value = torch.randn(param.shape, generator=gen) * 0.5 + (0.0 if family == "gemma" else 1.0)
                if zero_scale:
                    value[7] = -1.0 if family == "gemma" else 0.0
                param.copy_(value)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, tokens=None):
    with torch.no_grad():
        return model(ids() if tokens is None else tokens).logits


snapshot = model_snapshot  # the shared whole-model snapshot (tests/helpers.py)
assert_unchanged = assert_model_unchanged


def float64_norms(model, offset: float) -> None:
    """Evaluate every RMSNorm of this instance in float64: transformers' RMSNorm computes in float32 whatever
    the input's dtype, which alone moves float64 logits by ~1e-7 once the residual stream is rotated."""

    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (self.weight + offset)

    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            module.forward = types.MethodType(forward, module)


# ------------------------------------------------------------------------------------------ folding
@pytest.mark.parametrize("family", FAMILIES)
def test_folding_every_rotation_leaves_float64_logits_unchanged(family):
    model = model_of(family, zero_scale=True)
    float64_norms(model, 1.0 if family == "gemma" else 0.0)
    reference = logits(model)
    # the plan's edits alone (norm scales, R1, R2 and R4 folded; R3 online in attention), no quantizer
    plan = plan_qat(model, fastft.QATConfig(rotations={"r1": True, "r2": True, "r3": [0, 1], "r4": [0, 1]}))
    for edit in plan.edits:
        edit.apply(model)
    down = [module.base_layer for name, module in plan.swaps if name.endswith("down_proj")]
    hooks = [layer.register_forward_pre_hook(lambda m, args: (hadamard_transform(args[0]),)) for layer in down]
    rotated = logits(model)
    for hook in hooks:
        hook.remove()
    assert_close(rotated, reference)
    assert not torch.allclose(model.model.embed_tokens.weight, copy.deepcopy(model_of(family)).model.embed_tokens.weight)
    if family == "gemma":
        assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied while rotated
    for edit in reversed(plan.edits):
        edit.revert(model, merge=False)
    assert_close(logits(model), reference)


def test_folding_with_transformers_norms_is_within_float32_rounding():
    model = model_of("llama")
    reference = logits(model)
    plan = plan_qat(model, fastft.QATConfig(rotations=("r1", "r2")))
    for edit in plan.edits:
        edit.apply(model)
    torch.testing.assert_close(logits(model), reference, atol=1e-6, rtol=0)


def test_rotation_matches_its_dense_matrix():
    rotation = Rotation(96, seed=3)
    Q = torch.diag(rotation.signs.double()) @ hadamard_matrix(96, torch.float64).t()
    assert_close(rotation.matrix(), Q)
    assert_close(Q @ Q.t(), torch.eye(96, dtype=torch.float64))
    w = torch.randn(5, 96, dtype=torch.float64)
    assert_close(rotation.right_t(rotation.right(w)), w)
    assert_close(rotation.left_t(w.t()), (w @ Q).t())


# ------------------------------------------------------------------------------------ QuantLinear STE
def dense_linear(bias=True, in_features=96, out_features=40, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.float64)


@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("rotate", [False, True])
def test_quant_linear_ste_gradients(ste, rotate):
    config = fastft.QATConfig(w_bits=3, a_bits=4, clip_ratio=0.8, ste=ste, rotations=())
    base = dense_linear()
    layer = QuantLinear(base, config, rotate_input=rotate)
    x = torch.randn(7, 96, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 40, dtype=torch.float64)
    y = layer(x)
    y.backward(g)

    def written_out(t, bits):
        """Asymmetric min-max fake quantization of each row, clip 0.8, written out here (not fastft's op):
        (codes clamped to [0, 2^bits - 1], dequantized values, where the code was not clamped)."""
        qmax = 2 ** bits - 1
        hi = t.amax(-1, keepdim=True).clamp_min(0) * 0.8
        lo = t.amin(-1, keepdim=True).clamp_max(0) * 0.8
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        raw = torch.round(t / scale) + zero
        q = raw.clamp(0, qmax)
        return (q - zero) * scale, ((raw >= 0) & (raw <= qmax)).double()

    def kept(t, bits):  # where the code was not clamped (clipped STE)
        return written_out(t, bits)[1] if ste == "clipped" else torch.ones_like(t)

    H = hadamard_matrix(96, torch.float64)
    xr = x.detach() @ H.t() if rotate else x.detach()
    xq = written_out(xr, 4)[0]
    wq = written_out(base.weight.detach(), 3)[0]
    if ste == "clipped":
        assert kept(xr, 4).min() == 0 and kept(base.weight.detach(), 3).min() == 0  # clip 0.8 clamps some codes
    assert_close(y.detach(), xq @ wq.t() + base.bias.detach())
    grad_xr = (g @ wq) * kept(xr, 4)
    assert_close(x.grad, grad_xr @ H if rotate else grad_xr)
    assert_close(base.weight.grad, (g.t() @ xq) * kept(base.weight.detach(), 3))
    assert_close(base.bias.grad, g.sum(0))


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_quant_linear_under_lora_quantizes_the_merged_weight_and_trains_A_B(ste):
    config = fastft.QATConfig(w_bits=4, a_bits=8, w_granularity="group", group_size=32, symmetric=True,
                              clip_ratio=0.7, ste=ste, rotations=())
    base = dense_linear(bias=False).requires_grad_(False)  # as fastft.patch leaves it
    quant = QuantLinear(base, config)
    lora = LoRALinear(base, fastft.LoRAConfig(r=3, alpha=6))
    lora.rebase(quant)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    g = torch.randn(2, 5, 40, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora(x)
    y.backward(g)
    params = {p.data_ptr() for p in (base.weight, lora.lora_A, lora.lora_B)}
    assert [tuple(t.shape) for t in saved if t.data_ptr() not in params] == [(2, 5, 96)]  # Q_a(x) alone
    A, B, s = lora.lora_A.detach(), lora.lora_B.detach(), lora.scale
    xq = fake_quantize(x, 8, symmetric=True, clip_ratio=0.7).reshape(10, 96)
    merged = (base.weight.detach() + s * B @ A).requires_grad_(True)
    wq = fake_quantize(merged, 4, "group", 32, symmetric=True, clip_ratio=0.7, ste=ste)
    assert_close(y.detach().reshape(10, 40), xq @ wq.detach().t())
    (grad_w,) = torch.autograd.grad(wq, merged, g.reshape(10, 40).t() @ xq)  # the STE of Q_w, as the op defines it
    if ste == "clipped":
        assert (grad_w == 0).any()
    assert_close(lora.lora_B.grad, s * grad_w @ A.t())
    assert_close(lora.lora_A.grad, s * B.t() @ grad_w)
    assert base.weight.grad is None and quant.adapter_parameters() == {}


# ----------------------------------------------------------------------------------- outliers, W4A4
def llama_with_outliers(hidden=64, intermediate=128):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] = 20.0  # outlier channels entering q/k/v and gate/up
            layer.mlp.up_proj.weight[[5, 77]] *= 20.0  # outlier channels entering down_proj
    return model


def test_rotations_lower_the_w4a4_error_with_outlier_channels():
    model = llama_with_outliers()
    tokens = ids(shape=(4, 16))
    reference = logits(model, tokens)
    errors = {}
    for rotations in [(), ("r1", "r2", "r3", "r4")]:
        quantized = copy.deepcopy(model)
        fastft.patch(quantized, fastft.QATConfig(w_bits=4, a_bits=4, rotations=rotations))
        errors[rotations] = float((logits(quantized, tokens) - reference).norm() / reference.norm())
    plain, rotated = errors[()], errors[("r1", "r2", "r3", "r4")]
    assert rotated < 0.7 * plain, errors  # measured: 0.36 vs 0.60


# ------------------------------------------------------------------------------------------ adaptive
def test_adaptive_picks_rotations_per_layer_and_reports_them():
    model = model_of("llama")
    q1 = Rotation(64, seed=0).matrix()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # layer 0: down_proj's weight lies on the 4-bit grid once R1 is folded (R4 can only add error);
        # its keys are all zero (R3 cannot help)
        codes = torch.randint(0, 16, (64, 96), generator=gen).double()
        codes[:, 0], codes[:, 1] = 0, 15
        scales = torch.rand(64, 1, generator=gen, dtype=torch.float64) * 0.02 + 0.01
        model.model.layers[0].mlp.down_proj.weight.copy_(q1 @ ((codes - 8) * scales))
        model.model.layers[0].self_attn.k_proj.weight.zero_()
        # layer 1: an outlier input column of down_proj and outlier key channels
        model.model.layers[1].mlp.down_proj.weight[:, 11] *= 30.0
        model.model.layers[1].self_attn.k_proj.weight[[2, 20]] *= 30.0
    reference = copy.deepcopy(model)
    config = fastft.QATConfig(w_bits=4, a_bits=None, kv_bits=4, rotations="adaptive", calib=ids(3, (2, 16)))
    report = fastft.patch(model, config)
    chosen = patch_state(model).configs[0].rotations
    assert chosen == {"r1": True, "r2": True, "r3": (1,), "r4": (1,)}
    lines = [note for note in report.notes if note.startswith("adaptive rotations")]
    assert len(lines) == 2
    assert "layer 0: R4 dropped" in lines[0] and "R3 dropped" in lines[0]
    assert "layer 1: R4 kept" in lines[1] and "R3 kept" in lines[1]
    layers = model.model.layers
    assert [layers[i].mlp.down_proj.rotate_input for i in (0, 1)] == [False, True]
    assert [layers[i].self_attn.__dict__[SETTINGS_ATTR].r3 for i in (0, 1)] == [False, True]
    # the choice, given explicitly, builds the same model
    explicit = copy.deepcopy(reference)
    fastft.patch(explicit, fastft.QATConfig(w_bits=4, a_bits=None, kv_bits=4, rotations=chosen))
    assert torch.equal(logits(explicit), logits(model))


# ---------------------------------------------------------------------------------- QAT + LoRA, export
def train(model, steps=2, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(ids(1, (2, 12)), labels=ids(1, (2, 12))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("order", ["lora-first", "qat-first"])
def test_qat_plus_lora_trains_and_merges(order):
    model = model_of("qwen2", zero_scale=True)
    before = snapshot(model)
    lora, qat = fastft.LoRAConfig(r=4, alpha=8), fastft.QATConfig(w_bits=4, a_bits=8, kv_bits=8)
    report = fastft.patch(model, [lora, qat] if order == "lora-first" else [qat, lora])
    assert [c.method for c in patch_state(model).configs] == ["qat", "lora"]
    assert {r.kind for r in report} == {"qat", "lora"} and len(report) == 28
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base_layer, QuantLinear)
    randomize_lora(model)
    losses = train(model, steps=3)
    assert losses[-1] < losses[0]
    trained = logits(model)
    with pytest.warns(UserWarning, match="5 RMSNorm.* zero entries in their scale; their scales stay folded"):
        fastft.unpatch(model, merge=True)  # the test model's norms each hold a zero
    assert not any(isinstance(m, (LoRALinear, QuantLinear)) for m in model.modules())
    assert model.config._attn_implementation == before["config"][0]
    # the merged plain model, fake-quantized again by the same QAT config, is the model that trained
    fastft.patch(model, qat)
    assert_close(logits(model), trained)


@pytest.mark.parametrize("lora, match", [
    (fastft.LoRAConfig(r=4, dropout=0.1), "dropout=0.1 cannot be combined with QATConfig"),
    (fastft.LoRAConfig(r=4, init="pissa"), "init='pissa'"),
    (fastft.LoRAConfig(r=4, dora=True), "dora=True\\) cannot be combined with QATConfig"),
    (fastft.LoRAConfig(r=4, targets=["q_proj", "lm_head"]), "targets 'lm_head', which QAT's R1 rotates"),
])
def test_lora_that_cannot_go_with_qat_is_refused_before_anything_changes(lora, match):
    model = model_of("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastft.patch(model, [lora, fastft.QATConfig()])
    assert_unchanged(model, before)


@pytest.mark.parametrize("family, settings", [
    ("llama", dict(w_bits=4, a_bits=8, kv_bits=4)),
    ("gemma", dict(w_bits=3, a_bits=6, w_granularity="group", group_size=32, symmetric=True, clip_ratio=0.9)),
])
@pytest.mark.parametrize("with_lora", [False, True])
def test_export_then_load_gives_identical_outputs(tmp_path, family, settings, with_lora):
    model = model_of(family, torch.float32)
    configs = [fastft.QATConfig(**settings)] + ([fastft.LoRAConfig(r=4)] if with_lora else [])
    fastft.patch(model, configs)
    if with_lora:
        randomize_lora(model)
    train(model, steps=1, lr=0.01)
    fastft.export_quantized(model, tmp_path)
    loaded = fastft.load_quantized(config_of(family), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert all(isinstance(m, QuantLinear) and m.weight_on_grid for n, m in patch_state(loaded).modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "quantized.safetensors")
    codes = tensors["model.layers.0.mlp.down_proj.codes"]
    bits = settings["w_bits"]
    assert codes.dtype == (torch.int8 if settings.get("symmetric") else torch.uint8)
    assert int(codes.min()) >= qrange(bits, settings.get("symmetric", False))[0]
    assert int(codes.max()) <= qrange(bits, settings.get("symmetric", False))[1]


def test_save_load_of_qat_plus_lora_and_adaptive(tmp_path):
    model = model_of("mistral", torch.float32)
    fresh = copy.deepcopy(model)
    configs = [fastft.QATConfig(kv_bits=4, rotations="adaptive", calib=ids(2, (2, 16))), fastft.LoRAConfig(r=2)]
    fastft.patch(model, configs)
    randomize_lora(model)
    fastft.save(model, tmp_path)
    fastft.load(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))


def test_save_load_of_qat_alone(tmp_path):
    model = model_of("llama", torch.float32)
    fresh = copy.deepcopy(model)
    fastft.patch(model, fastft.QATConfig(w_bits=4, a_bits=8))
    train(model, steps=1, lr=0.01)
    fastft.save(model, tmp_path)
    fastft.load(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))


# -------------------------------------------------------------------------------------- KV and R3
def test_kv_quantization_runs_inside_attention_and_r3_needs_it():
    model = model_of("llama")
    plain = copy.deepcopy(model)
    report = fastft.patch(plain, fastft.QATConfig(rotations=("r1", "r2", "r3")))
    assert any("R3 skipped" in note for note in report.notes)
    assert plain.config._attn_implementation == "sdpa"  # nothing to do inside attention
    fastft.patch(model, fastft.QATConfig(rotations=("r1", "r2", "r3"), kv_bits=2))
    assert model.config._attn_implementation == "fastft_qat_sdpa"
    assert not torch.allclose(logits(model), logits(plain), atol=1e-3)
    fastft.unpatch(model, merge=False)
    assert model.config._attn_implementation == "sdpa"
    assert not any(SETTINGS_ATTR in m.__dict__ for m in model.modules())


def test_eager_attention_gives_the_sdpa_result():
    sdpa, eager = model_of("gemma"), model_of("gemma")
    eager.config._attn_implementation = "eager"
    for model in (sdpa, eager):
        fastft.patch(model, fastft.QATConfig(kv_bits=4))
    # eager attention takes its softmax in float32, also in a float64 model
    torch.testing.assert_close(logits(eager), logits(sdpa), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- bad input, unpatch
@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=1), r"w_bits=1: use an integer number of bits from 2 to 8"),
    (dict(w_bits=None), r"w_bits=None"),
    (dict(a_bits=9), r"a_bits=9: .* or None"),
    (dict(kv_bits=4.0), r"kv_bits=4.0"),
    (dict(w_granularity="tensor"), r"w_granularity='tensor': choose one of \['channel', 'group'\]"),
    (dict(a_granularity="channel"), r"a_granularity='channel'"),
    (dict(group_size=0), r"group_size=0: a positive integer"),
    (dict(clip_ratio=0.0), r"clip_ratio=0.0: a number in \(0, 1\]"),
    (dict(clip_ratio=1.5), r"clip_ratio=1.5"),
    (dict(ste="round"), r"ste='round'"),
    (dict(rotations=("r1", "r5")), r"rotations=\('r1', 'r5'\): use a subset"),
    (dict(rotations=("r1", "r1")), r"without repeats"),
    (dict(rotations={"r3": [0], "r9": True}), r"unknown keys \['r9'\]"),
    (dict(rotations="adaptive"), r"needs calib"),
    (dict(calib=torch.zeros(2, 3, dtype=torch.long)), r"calib is used only with rotations='adaptive'"),
    (dict(rotations="adaptive", calib=torch.zeros(2, 3)), r"calib must be a calibration batch of token ids"),
])
def test_bad_config_values_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.QATConfig(**kwargs)


@pytest.mark.parametrize("kwargs, intermediate, match", [
    (dict(w_granularity="group", group_size=48), 96, r"group_size=48 does not divide the input width 64 of model\.layers\.0\.self_attn\.q_proj"),
    (dict(a_granularity="group", group_size=64), 96, r"does not divide the input width 96 of model\.layers\.0\.mlp\.down_proj"),
    (dict(rotations=("r1", "r4")), 92, r"R4 \(intermediate_size\): no Hadamard transform of size d=92"),
    (dict(rotations="adaptive", calib=torch.zeros(1, 4, dtype=torch.long)), 92, r"d=92"),
    (dict(rotations={"r1": True, "r2": False, "r3": [], "r4": [2]}), 96, r"rotations\['r4'\] names layers \[2\]"),
])
def test_bad_patch_is_refused_before_any_weight_is_touched(kwargs, intermediate, match):
    model = model_of("gemma", intermediate=intermediate)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastft.patch(model, fastft.QATConfig(**kwargs))
    assert_unchanged(model, before)


def test_unsupported_attention_and_family():
    model = model_of("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    before = snapshot(model)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        fastft.patch(model, fastft.QATConfig(kv_bits=4))
    assert_unchanged(model, before)
    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                         num_attention_heads=4, word_embed_proj_dim=64)).eval()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"model_type='opt'.*Supported families.*rotations=\(\), kv_bits=None"):
        fastft.patch(opt, fastft.QATConfig())
    assert_unchanged(opt, before)
    report = fastft.patch(opt, fastft.QATConfig(rotations=()))
    assert len(report) == 6


@pytest.mark.parametrize("family", ["gemma", "qwen2"])
def test_unpatch_restores_the_original_model(family):
    model = model_of(family)
    before = snapshot(model)
    fastft.patch(model, fastft.QATConfig(w_bits=4, a_bits=4, kv_bits=4))
    assert train(model, steps=1, lr=0.01)
    fastft.unpatch(model, merge=False)
    assert_unchanged(model, before)
    assert family != "gemma" or model.lm_head.weight is model.model.embed_tokens.weight
    # merge=True right away: the rotations come back out (exactly, up to float64 rounding)
    reference = logits(model)
    fastft.patch(model, fastft.QATConfig(w_bits=4, a_bits=4, kv_bits=4))
    fastft.unpatch(model, merge=True)
    assert_close(logits(model), reference)
    assert snapshot(model)["modules"] == before["modules"]


def test_qat_alone_trains_the_weights_and_merge_keeps_what_trained():
    model = model_of("llama")
    report = fastft.patch(model, fastft.QATConfig(w_bits=4, a_bits=8))
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "proj" in n)
    train(model, steps=2, lr=0.01)
    trained = logits(model)
    fastft.unpatch(model, merge=True)
    fastft.patch(model, fastft.QATConfig(w_bits=4, a_bits=8))
    assert_close(logits(model), trained)


def test_triton_backend_gives_the_torch_result():
    """The whole QAT+LoRA model on the QAT ops' Triton kernels (interpreter on CPU) against the reference."""
    from helpers import backend

    model = model_of("llama", torch.float32)
    fastft.patch(model, [fastft.QATConfig(w_bits=4, a_bits=8, kv_bits=4), fastft.LoRAConfig(r=4)])
    randomize_lora(model)
    results = {}
    for name in ("torch", "triton"):
        with backend(name):
            out = model(ids()).logits
            out.square().sum().backward()
        layer = model.model.layers[0].mlp.down_proj
        results[name] = (out.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        model.zero_grad()
    for got, want in zip(results["triton"], results["torch"]):
        assert_close(got, want)
