"""Property fuzz: for any config value or tensor shape, fastft gives a clear error (TypeError / ValueError)
with the model unchanged, or a correct, finite result; never NaN, never a changed model after an error."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import fastft
from fastft.ops import linear_cross_entropy, lora_linear
from model_snapshot import assert_unchanged, snapshot

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=16)
X = torch.randint(0, 32, (1, 4))

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3), st.just([]), st.just((1,)),
)
floatish = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 64), anything)


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


def refused_or_finite(make_config, run=None):
    model = tiny()
    before = snapshot(model)
    try:
        config = make_config()
        fastft.patch(model, config)
    except (TypeError, ValueError) as err:
        assert str(err)
        assert_unchanged(model, before)
        return
    with torch.no_grad():
        out = model(X).logits if run is None else run(model)
    assert torch.isfinite(out).all(), config
    fastft.unpatch(model, merge=False)
    assert_unchanged(model, before)


@FUZZ
@given(r=anything, alpha=floatish, dropout=floatish, rslora=anything, init=st.sampled_from(["default", "gaussian", "pissa", "x"]))
def test_lora_config_values(r, alpha, dropout, rslora, init):
    refused_or_finite(lambda: fastft.LoRAConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                                                targets=["q_proj", "down_proj"]))


@FUZZ
@given(z=floatish, smoothing=floatish, softcap=st.one_of(st.none(), floatish), kind=st.sampled_from(["ce", "dft", "talr"]))
def test_loss_config_values(z, smoothing, softcap, kind):
    labels = torch.randint(0, 32, (1, 4))
    refused_or_finite(lambda: fastft.LossConfig(kind=kind, z_loss=z, label_smoothing=smoothing, logit_softcap=softcap),
                      run=lambda m: (m.train(), m(X, labels=labels).loss, m.eval())[1])


@FUZZ
@given(ffn=floatish, seed=anything, rows=anything)
def test_s2ft_config_values(ffn, seed, rows):
    refused_or_finite(lambda: fastft.S2FTConfig(ffn_ratio=ffn, seed=seed, rows=rows))


@FUZZ
@given(w_bits=anything, clip=floatish, group=anything)
def test_qat_config_values(w_bits, clip, group):
    refused_or_finite(lambda: fastft.QATConfig(w_bits=w_bits, clip_ratio=clip, group_size=group, a_bits=None,
                                               w_granularity="group" if isinstance(group, int) else "channel",
                                               rotations=()))


@FUZZ
@given(n=st.integers(1, 5), fin=st.integers(1, 9), fout=st.integers(1, 9), r=st.integers(1, 4),
       a_in=st.integers(1, 9), b_out=st.integers(1, 9), scale=floatish)
def test_lora_op_shapes(n, fin, fout, r, a_in, b_out, scale):
    torch.manual_seed(0)
    x, w = torch.randn(n, fin), torch.randn(fout, fin)
    a, b = torch.randn(r, a_in), torch.randn(b_out, r)
    try:
        y = lora_linear(x, w, None, a, b, scale)
    except (TypeError, ValueError) as err:
        assert str(err)
        return
    assert y.shape == (n, fout) and torch.isfinite(y).all()
    torch.testing.assert_close(y, x @ w.T + scale * (x @ a.T) @ b.T)


@FUZZ
@given(n=st.integers(1, 6), ignored=st.integers(0, 6), num_items=st.one_of(st.none(), floatish,
       st.builds(torch.tensor, st.one_of(st.integers(-2, 20), st.floats(allow_nan=True, allow_infinity=True)))))
def test_fused_loss_num_items(n, ignored, num_items):
    torch.manual_seed(0)
    h, w = torch.randn(n, 8), torch.randn(16, 8)
    labels = torch.randint(0, 16, (n,))
    labels[: min(ignored, n)] = -100
    try:
        loss = linear_cross_entropy(h, w, labels, num_items_in_batch=num_items)
    except (TypeError, ValueError) as err:
        assert str(err)
        return
    assert math.isfinite(float(loss))
