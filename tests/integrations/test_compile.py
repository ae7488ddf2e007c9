"""torch.compile: a patched decoder layer traces as one graph (no graph break, counted with torch._dynamo.explain)
for every method, and a compiled training step (forward + backward) equals the eager one.

Compile time is the cost here, so: the graph-break counts trace without compiling; the step equality of every
method runs through AOTAutograd with the ``aot_eager`` backend (the fake kernels, the autograd registrations and
the functionalized graphs of forward and backward, without code generation), on one-layer models, methods that
can share a model sharing one compile; one small stack of every op family (LoRA with dropout, QLoRA, DoRA, S²FT,
QAT, the fused loss) is compiled with inductor (C++ code generation on the CPU, the costly part: one compile).
"""
import pytest
import torch
from helpers import TOLERANCES, quantize_linears, randomize_lora, tiny_config

import fastft

IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))

METHODS = {
    "lora": (lambda: fastft.LoRAConfig(r=4), False),
    "lora-dropout": (lambda: fastft.LoRAConfig(r=4, dropout=0.1), False),
    "qlora": (lambda: fastft.LoRAConfig(r=4), True),
    "dora-dropout": (lambda: fastft.LoRAConfig(r=4, dora=True, dropout=0.1), False),
    "dora-exact-norm": (lambda: fastft.LoRAConfig(r=4, dora=True, dora_detach_norm=False), False),
    "qdora": (lambda: fastft.LoRAConfig(r=4, dora=True), True),
    "qat+lora": (lambda: [fastft.QATConfig(w_bits=4, a_bits=8, kv_bits=4, group_size=16, ste="clipped"),
                          fastft.LoRAConfig(r=4)], False),
    "qat": (lambda: fastft.QATConfig(w_bits=4, a_bits=8, group_size=16), False),
    "s2ft": (lambda: fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.5, rows=True), False),
    "lora-head+loss": (lambda: [fastft.LoRAConfig(r=4, targets=["q_proj", "lm_head"]), fastft.LossConfig(z_loss=1e-4)],
                       False),
}


def one_layer_llama():
    """The tests' tiny Llama with a single decoder layer: tracing and compiling cost scale with the layers."""
    import transformers

    config = tiny_config("llama")
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def patched(method, model=None):
    build, four_bit = METHODS[method]
    if four_bit:
        pytest.importorskip("bitsandbytes", reason="QLoRA/QDoRA need bitsandbytes; install fastft[test]")
    model = model if model is not None else one_layer_llama()
    if four_bit:
        quantize_linears(model)
    fastft.patch(model, build())
    randomize_lora(model)
    return model.train()


def layer_call(model):
    """The first decoder layer as a function of its hidden-state input, with the arguments the model passes it."""
    seen = {}
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=IDS)
    handle.remove()
    kwargs = dict(seen["kwargs"])
    hidden = seen["args"][0] if seen["args"] else kwargs.pop("hidden_states")

    def run(h):
        out = layer(h, **kwargs)
        return (out[0] if isinstance(out, tuple) else out).sum()

    return run, hidden.detach().requires_grad_(True)


@pytest.mark.parametrize("method", list(METHODS))
def test_no_graph_break_in_a_patched_decoder_layer(method):
    model = patched(method)
    run, hidden = layer_call(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(run)(hidden)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_whole_model_with_the_fused_loss_is_one_graph():
    model = patched("lora-head+loss")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(IDS)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]


def loss_and_grads(model, step):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks in both runs
    loss = step()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def causal_lm_loss(model):
    return model(input_ids=IDS, labels=IDS).loss


def assert_same_step(model, backend, loss_of=causal_lm_loss):
    want_loss, want = loss_and_grads(model, lambda: loss_of(model))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got_loss, got = loss_and_grads(model, lambda: loss_of(compiled))
    torch.testing.assert_close(got_loss, want_loss, **TOLERANCES[torch.float32])
    assert set(got) == set(want) and all(g is not None for g in got.values())
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, **TOLERANCES[torch.float32], msg=name)


# Methods that can share a model share one compile: every method's ops are in some compiled step.
STEP_GROUPS = {
    "lora-dropout+s2ft+loss": lambda: [
        fastft.LoRAConfig(r=4, dropout=0.1, targets=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]),
        fastft.S2FTConfig(ffn_ratio=0.1), fastft.LossConfig(z_loss=1e-4)],
    "dora-dropout": lambda: fastft.LoRAConfig(r=4, dora=True, dropout=0.1),
    "qdora-exact-norm": lambda: fastft.LoRAConfig(r=4, dora=True, dora_detach_norm=False),
    "qlora": lambda: fastft.LoRAConfig(r=4),
    "qat+lora": METHODS["qat+lora"][0],
    "qat": METHODS["qat"][0],
    "s2ft-heads-rows": METHODS["s2ft"][0],
}


@pytest.mark.parametrize("group", list(STEP_GROUPS))
def test_compiled_step_equals_eager_aot(group):
    """The whole model compiled as one graph (fullgraph=True), forward and backward through AOTAutograd."""
    model = one_layer_llama()
    if group.startswith("q") and not group.startswith("qat"):
        pytest.importorskip("bitsandbytes", reason="QLoRA/QDoRA need bitsandbytes; install fastft[test]")
        quantize_linears(model)
    fastft.patch(model, STEP_GROUPS[group]())
    randomize_lora(model)
    assert_same_step(model.train(), "aot_eager")


def test_compiled_step_equals_eager_inductor():
    """One inductor compile (C++ code generation: the costly one) of a training step through every op family:
    LoRA with dropout, QLoRA (4-bit dequantization), DoRA, S²FT, QAT (R4 rotation, clipped STE) and the fused
    loss. ``fallback_random`` makes inductor draw the dropout mask with eager's generator."""
    bnb = pytest.importorskip("bitsandbytes", reason="the QLoRA layer needs bitsandbytes; install fastft[test]")
    from fastft.nn import LoRALinear, QuantLinear, S2FTLinear
    from fastft.ops import linear_cross_entropy

    def frozen(layer):
        return layer.requires_grad_(False)

    four_bit = bnb.nn.Linear4bit(48, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    four_bit.load_state_dict(torch.nn.Linear(48, 48, bias=False).state_dict())
    four_bit = four_bit.to("cpu")  # bitsandbytes quantizes on the move to a device

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = LoRALinear(frozen(torch.nn.Linear(32, 48)), fastft.LoRAConfig(r=4, dropout=0.1))
            self.qlora = LoRALinear(frozen(four_bit), fastft.LoRAConfig(r=4))
            self.dora = LoRALinear.from_linear(frozen(torch.nn.Linear(48, 40, bias=False)), fastft.LoRAConfig(r=4, dora=True))
            self.s2ft = S2FTLinear(frozen(torch.nn.Linear(40, 32)), width=8)
            self.qat = QuantLinear(torch.nn.Linear(32, 32), fastft.QATConfig(w_bits=4, a_bits=8, group_size=16, ste="clipped"),
                                   rotate_input=True)
            self.head = torch.nn.Linear(32, 50)

        def forward(self, features, labels):
            h = torch.nn.functional.silu(self.lora(features))
            h = self.s2ft(self.dora(self.qlora(h)))
            return linear_cross_entropy(self.qat(h), self.head.weight, labels, self.head.bias, z_loss=1e-4)

    torch.manual_seed(0)
    model = Stack()
    randomize_lora(model)
    features = torch.randn(2, 6, 32)
    labels = torch.randint(0, 50, (2, 6))
    with torch._inductor.config.patch(fallback_random=True):
        assert_same_step(model.train(), "inductor", loss_of=lambda m: m(features, labels))
