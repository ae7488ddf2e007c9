"""fastft.merge: each formula against hand-computed values on tiny tensors, the mismatch errors, and
merging LoRA-fine-tuned tiny models end to end (state dicts, patched models, adapter directories)."""
import copy
import math

import pytest
import torch
from helpers import assert_close, randomize_lora, tiny_model, written_out_merges

import fastft
from fastft.merging import infer_layer_stack, lines_scale, model_stock_ratio


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a CPU shared with other jobs, two threads wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------------------------------- formulas
def test_uniform_soup_is_the_average_and_needs_no_base():
    a = {"w": t(1.0, 2.0), "b": t(0.0)}
    b = {"w": t(3.0, 6.0), "b": t(1.0)}
    c = {"w": t(2.0, 1.0), "b": t(5.0)}
    merged = fastft.merge(None, [a, b, c], method="soup")
    assert torch.equal(merged["w"], t(2.0, 3.0))
    assert torch.equal(merged["b"], t(2.0))
    # with a base it is only checked against, not mixed in
    assert torch.equal(fastft.merge({"w": t(100.0, 100.0), "b": t(7.0)}, [a, b, c])["w"], t(2.0, 3.0))


def test_task_arithmetic_adds_scaled_task_vectors():
    base = {"w": t(1.0, 1.0, 1.0)}
    a = {"w": t(2.0, 1.0, 1.0)}  # τ_a = (1, 0, 0)
    b = {"w": t(1.0, 3.0, 0.0)}  # τ_b = (0, 2, -1)
    assert torch.equal(fastft.merge(base, [a, b], method="task_arithmetic")["w"], t(2.0, 3.0, 0.0))
    assert torch.equal(fastft.merge(base, [a, b], method="task_arithmetic", scale=0.5)["w"], t(1.5, 2.0, 0.5))
    assert torch.equal(fastft.merge(base, [a, b], method="task_arithmetic", scale=[2.0, -1.0])["w"], t(3.0, -1.0, 2.0))


def test_model_stock_ratio_at_known_angles():
    assert model_stock_ratio(1.0, 2) == 1.0          # θ = 0: the average of the fine-tuned models
    assert model_stock_ratio(0.0, 2) == 0.0          # orthogonal: the base
    assert math.isclose(model_stock_ratio(0.5, 2), 2 / 3)   # θ = 60°: 2·½ / (1 + ½)
    assert math.isclose(model_stock_ratio(0.5, 3), 0.75)    # N = 3: 3·½ / (1 + 2·½)
    assert model_stock_ratio(-0.5, 2) == 0.0          # obtuse: clamped to the base, never negative
    assert model_stock_ratio(-1.0, 2) == 0.0          # (unclamped this divides by zero)


def test_model_stock_merges_each_tensor_with_its_own_angle():
    base = {"same": t(1.0, 1.0), "orth": t(0.0, 0.0), "sixty": t(1.0, 1.0), "obtuse": t(0.0, 0.0), "still": t(4.0, 4.0)}
    s3 = math.sqrt(3.0)
    a = {"same": t(2.0, 3.0), "orth": t(1.0, 0.0), "sixty": t(2.0, 1.0), "obtuse": t(1.0, 0.0), "still": t(4.0, 4.0)}
    b = {"same": t(3.0, 5.0), "orth": t(0.0, 2.0), "sixty": t(1.5, 1 + s3 / 2), "obtuse": t(-1.0, 0.1),
         "still": t(4.0, 4.0)}
    merged = fastft.merge(base, [a, b], method="model_stock")
    assert_close(merged["same"], t(2.5, 4.0))       # τ_b = 2 τ_a: θ = 0, t = 1, the plain average
    assert_close(merged["orth"], t(0.0, 0.0))       # orthogonal updates: t = 0, the base
    # 60°: τ_a = (1, 0), τ_b = (½, √3/2); t = 2/3; w = w0 + t·mean(τ) = (1 + ½, 1 + √3/6)
    assert_close(merged["sixty"], t(1.5, 1 + s3 / 6))
    assert_close(merged["obtuse"], t(0.0, 0.0))     # cos θ < 0: taken as 0, the base
    assert_close(merged["still"], t(4.0, 4.0))      # no update at all: the base
    # written as the paper does: t·(w1 + w2)/2 + (1 - t)·w0
    tt = 2 / 3
    assert_close(merged["sixty"], tt * (a["sixty"] + b["sixty"]) / 2 + (1 - tt) * base["sixty"])


def test_model_stock_with_three_models_uses_the_mean_pairwise_cosine():
    base = {"w": t(0.0, 0.0, 0.0)}
    models = [{"w": t(1.0, 0.0, 0.0)}, {"w": t(0.0, 1.0, 0.0)}, {"w": t(1.0, 1.0, 0.0)}]
    c = (0.0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3   # pairs (1,2), (1,3), (2,3)
    tt = 3 * c / (1 + 2 * c)
    merged = fastft.merge(base, models, method="model_stock")
    assert_close(merged["w"], tt * t(2 / 3, 2 / 3, 0.0))


def test_lines_scales_each_layer_linearly_and_the_rest_by_alpha():
    names = ["embed.weight"] + [f"model.layers.{i}.w" for i in range(4)] + ["norm.weight"]
    base = {k: t(1.0, 1.0) for k in names}
    a = {k: t(2.0, 1.0) for k in names}      # τ_a = (1, 0) everywhere
    b = {k: t(1.0, 3.0) for k in names}      # τ_b = (0, 2)
    alpha, beta = 0.25, 0.6
    merged = fastft.merge(base, [a, b], method="lines", alpha=alpha, beta=beta)
    for i in range(4):
        lam = alpha + beta * i / 3            # ℓ = i + 1: α + β(ℓ-1)/(L-1)
        assert_close(merged[f"model.layers.{i}.w"], t(1 + lam, 1 + 2 * lam))
    assert_close(merged["model.layers.0.w"], t(1.25, 1.5))        # the shallowest layer: α
    assert_close(merged["model.layers.3.w"], t(1.85, 2.7))        # the deepest: α + β
    for k in ("embed.weight", "norm.weight"):
        assert_close(merged[k], t(1.25, 1.5))                      # outside the stack: α (the paper's code)
    outside = fastft.merge(base, [a], method="lines", alpha=alpha, beta=beta, outside=1.0)
    assert_close(outside["embed.weight"], t(2.0, 1.0))
    assert lines_scale(None, 4, alpha, beta) == alpha and lines_scale(3, 4, alpha, beta) == alpha + beta


def test_lines_finds_the_stack_of_a_base_model_or_in_the_names():
    assert infer_layer_stack(["bert.embeddings.w", "bert.encoder.layer.0.a", "bert.encoder.layer.0.b",
                              "bert.encoder.layer.5.a", "heads.0.w"]) == ("bert.encoder.layer", 6)
    assert infer_layer_stack(["a.w", "b.w"]) is None
    base_model = tiny_model("llama", torch.float64)
    base = base_model.state_dict()
    tuned = {k: v + 1.0 for k, v in base.items()}
    merged = fastft.merge(base_model, [tuned], method="lines", alpha=0.0, beta=1.0)
    # two decoder layers: the first keeps the base (λ = 0), the second the full update (λ = 1); the rest α = 0
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert_close(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"] + 1.0)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # a partial stack needs num_layers: the scale is by position in the whole stack
    part = {"layers.2.w": t(0.0)}
    merged = fastft.merge(part, [{"layers.2.w": t(1.0)}], method="lines", alpha=0.0, beta=1.0, num_layers=5,
                          layer_prefix="layers")
    assert_close(merged["layers.2.w"], t(0.5))


def test_results_keep_each_dtype_and_copy_integer_buffers():
    base = {"w": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(3)}
    a = {"w": torch.full((3,), 1.5, dtype=torch.bfloat16), "ids": torch.arange(3)}
    b = {"w": torch.full((3,), 2.5, dtype=torch.bfloat16), "ids": torch.arange(3)}
    merged = fastft.merge(base, [a, b], method="task_arithmetic", scale=0.5)
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["w"], torch.full((3,), 2.0, dtype=torch.bfloat16))
    assert torch.equal(merged["ids"], torch.arange(3))


# ------------------------------------------------------------------------------------------- errors
def test_mismatched_state_dicts_name_the_first_difference():
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"models\[1\] has no 'b', which the base has"):
        fastft.merge(base, [dict(base), {"a": torch.zeros(2, 3)}], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"models\[0\] has 'c', which the base has not"):
        fastft.merge(base, [{**base, "c": torch.zeros(1)}], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"models\[0\]\['a'\] has shape \(3, 2\), the base \(2, 3\)"):
        fastft.merge(base, [{"a": torch.zeros(3, 2), "b": torch.zeros(4)}], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"models\[0\]\['b'\] is torch.float16, the base torch.float32"):
        fastft.merge(base, [{"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"models\[1\] has no 'b', which models\[0\] has"):
        fastft.merge(None, [base, {"a": torch.zeros(2, 3)}], method="soup")
    with pytest.raises(ValueError, match="non-float tensor 'i'"):
        fastft.merge({"i": torch.arange(2)}, [{"i": torch.arange(2) + 1}], method="task_arithmetic")


def test_bad_calls_are_refused_clearly():
    sd = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="choose one of"):
        fastft.merge(sd, [sd], method="ties")
    with pytest.raises(ValueError, match=r"does not take \['alpha'\]"):
        fastft.merge(sd, [sd], method="soup", alpha=1.0)
    with pytest.raises(ValueError, match="needs the base model"):
        fastft.merge(None, [sd, sd], method="model_stock")
    with pytest.raises(ValueError, match="at least two fine-tuned models"):
        fastft.merge(sd, [sd], method="model_stock")
    with pytest.raises(ValueError, match="non-empty list"):
        fastft.merge(sd, sd, method="soup")
    with pytest.raises(ValueError, match="needs numbers alpha and beta"):
        fastft.merge(sd, [sd], method="lines", alpha=0.5)
    with pytest.raises(ValueError, match="layer stack"):
        fastft.merge(sd, [sd], method="lines", alpha=0.5, beta=0.5)
    with pytest.raises(ValueError, match="one number per model"):
        fastft.merge(sd, [sd, sd], method="task_arithmetic", scale=[1.0])
    with pytest.raises(ValueError, match="adapter directory"):
        fastft.merge(sd, ["some/dir"], method="task_arithmetic")
    with pytest.raises(TypeError, match=r"models\[0\]\['w'\] is a list"):
        fastft.merge(sd, [{"w": [1.0, 2.0]}], method="task_arithmetic")


# ------------------------------------------------------------------------- adapters to full state dicts
@pytest.mark.parametrize("dora", [False, True])
def test_merged_state_dict_of_a_patched_model_is_what_unpatch_merge_gives(dora):
    base = tiny_model("llama", torch.float32)
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8, dora=dora))
    randomize_lora(model)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    written = written_out_merges(model, alpha=8, r=4)  # W + 2·B·A, DoRA's m ⊙ (W + 2·B·A)/‖·‖
    merged = fastft.merged_state_dict(model)
    assert fastft.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # the model is not changed
    assert len(written) == 14
    for key, weight in written.items():
        assert_close(merged[key], weight, torch.float32, msg=key)
    expected = fastft.unpatch(copy.deepcopy(model), merge=True).state_dict()
    assert list(merged) == list(expected) == list(base.state_dict())
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def test_merged_state_dict_reads_lora_beside_a_fused_loss_and_refuses_other_patches():
    base = tiny_model("llama", torch.float32)
    model = copy.deepcopy(base)
    fastft.patch(model, [fastft.LoRAConfig(r=2, targets=["v_proj"]), fastft.LossConfig()])
    randomize_lora(model)
    merged = fastft.merged_state_dict(model)
    expected = fastft.unpatch(copy.deepcopy(model), merge=True).state_dict()
    assert all(torch.equal(merged[key], expected[key]) for key in expected) and list(merged) == list(expected)
    quantized = copy.deepcopy(base)
    fastft.patch(quantized, fastft.QATConfig(rotations=()))
    with pytest.raises(ValueError, match="patched with 'qat'"):
        fastft.merged_state_dict(quantized)


def test_merged_state_dict_merges_a_tied_lm_head_into_the_embeddings_too():
    import transformers

    from helpers import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fastft.patch(model, fastft.LoRAConfig(r=2, targets=["q_proj", "lm_head"]))
    randomize_lora(model)
    merged = fastft.merged_state_dict(model)
    expected = fastft.unpatch(copy.deepcopy(model), merge=True).state_dict()  # merging writes the shared tensor
    assert list(merged) == list(expected)
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def test_merged_state_dict_from_adapter_directories_leaves_the_base_as_it_was(tmp_path):
    pytest.importorskip("peft", reason="PEFT adapters are read by fastft.from_peft; install fastft[test]")
    base = tiny_model("qwen2", torch.float32)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize_lora(model)
    expected = fastft.merged_state_dict(model)
    for key, weight in written_out_merges(model, alpha=8, r=4).items():  # W + 2·B·A
        assert_close(expected[key], weight, torch.float32, msg=key)
    fastft.save(model, tmp_path / "fastft")
    fastft.export_peft(model, tmp_path / "peft")
    for directory in (tmp_path / "fastft", tmp_path / "peft"):
        merged = fastft.merged_state_dict(base, directory)
        assert not fastft.is_patched(base)
        assert list(merged) == list(expected)
        for key in expected:
            assert_close(merged[key], expected[key], msg=f"{directory.name} {key}")
        for key, value in base.state_dict().items():
            assert torch.equal(value, original[key]), key
    with pytest.raises(FileNotFoundError, match="neither"):
        fastft.merged_state_dict(base, tmp_path)


# -------------------------------------------------------------------------------------------- end to end
def task_batch(offset, seed, shape=(8, 10)):
    """Token ids drawn from {offset, ..., offset + 7}: a tiny model learns to put its mass there quickly."""
    g = torch.Generator().manual_seed(seed)
    ids = offset + torch.randint(0, 8, shape, generator=g)
    return dict(input_ids=ids, labels=ids)


def fine_tune(base, offset, seed, steps=12):
    model = copy.deepcopy(base).train()
    torch.manual_seed(seed)
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(steps):
        loss = model(**task_batch(offset, seed * 100 + step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def loss_of(model_or_state, base, offset):
    model = model_or_state
    if isinstance(model_or_state, dict):
        model = copy.deepcopy(base)
        model.load_state_dict(model_or_state)
    with torch.no_grad():
        return float(model(**task_batch(offset, seed=999)).loss)


def test_merging_two_lora_fine_tuned_models_end_to_end(tmp_path):
    base = tiny_model("llama", torch.float32)
    with torch.no_grad():
        base.lm_head.weight.mul_(10)  # a "pretrained" head sharp enough for a few LoRA steps to show
    up1, up2 = fine_tune(base, offset=0, seed=1), fine_tune(base, offset=50, seed=2)
    base_loss = {s: loss_of(base, base, s) for s in (0, 50)}
    assert loss_of(up1, base, 0) < 0.7 * base_loss[0] and loss_of(up2, base, 50) < 0.7 * base_loss[50]

    # two tasks: task arithmetic does both far better than the base
    both = fastft.merge(base, [up1, up2], method="task_arithmetic", scale=1.0)
    for s in (0, 50):
        assert loss_of(both, base, s) < 0.8 * base_loss[s], s
    # patched models and their saved adapter directories give the same merge
    fastft.save(up1, tmp_path / "up1")
    fastft.export_peft(up2, tmp_path / "up2")
    from_dirs = fastft.merge(base, [tmp_path / "up1", str(tmp_path / "up2")], method="task_arithmetic")
    for key in both:
        assert_close(from_dirs[key], both[key], msg=key)

    # one task twice (two seeds): Model Stock and the soup; the formula per tensor on the merged state dicts
    again = fine_tune(base, offset=0, seed=3)
    stock = fastft.merge(base, [up1, again], method="model_stock")
    soup = fastft.merge(base, [up1, again], method="soup")
    w0 = base.state_dict()
    w1, w2 = fastft.merged_state_dict(up1), fastft.merged_state_dict(again)
    changed = 0
    for key in w0:
        d1, d2 = (w1[key] - w0[key]).double(), (w2[key] - w0[key]).double()
        if d1.norm() == 0 or d2.norm() == 0:
            assert torch.equal(stock[key], w0[key]), key   # untouched (or touched by one only): the base
            continue
        changed += 1
        cos = float((d1 * d2).sum() / (d1.norm() * d2.norm()))
        tt = 2 * max(cos, 0.0) / (1 + max(cos, 0.0))
        assert_close(stock[key], (tt * (w1[key] + w2[key]) / 2 + (1 - tt) * w0[key]).float(), msg=key)
        assert_close(soup[key], (w1[key] + w2[key]) / 2, msg=key)
    assert changed == 2 * 7  # every LoRA-adapted weight of the two decoder layers
    assert loss_of(stock, base, 0) < 0.7 * base_loss[0]
    assert loss_of(soup, base, 0) < 0.7 * base_loss[0]

    # LiNeS on one model: α = 0, β = 1 keeps the first layer at the base, the last fully fine-tuned
    lines = fastft.merge(base, [up1], method="lines", alpha=0.0, beta=1.0)
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(lines[q0], w0[q0])
    assert_close(lines[q1], w1[q1])
