"""Tiny random models of every text architecture transformers' auto mappings name, built from config classes
(nothing downloaded), for the zoo test (tests/plans/test_zoo.py) and the support table (docs/support.md).

``zoo_entries()`` lists (model_type, head, class name) for every model type with a causal-LM, seq2seq-LM or
masked-LM class; ``build(model_type)`` shrinks the config class's defaults generically (hidden size, layers, heads,
vocabulary, experts) and returns ``(model, None)`` or ``(None, reason)``: the reason is why it cannot be built tiny
here (needs a download, a sub-config, an optional package, or the shrunk config is inconsistent)."""
from __future__ import annotations

import functools
import warnings

import torch

HEADS = (("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"), ("seq2seq-lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
         ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"))
VOCAB = 96
MAX_PARAMS = 5_000_000
SIZES = {  # attribute -> tiny value, set where the config has the attribute
    "vocab_size": VOCAB, "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "n_embed": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "d_kv": 8, "kv_channels": 8, "attention_head_size": 8,
    "intermediate_size": 40, "ffn_dim": 40, "d_ff": 40, "encoder_ffn_dim": 40, "decoder_ffn_dim": 40, "n_inner": 40,
    "ffn_hidden_size": 40, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "max_position_embeddings": 64, "n_positions": 64,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "embedding_size": 32, "num_global_key_value_heads": 2,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
             "cls_token_id", "mask_token_id", "unk_token_id")


def zoo_entries() -> list[tuple[str, str, str]]:
    """(model_type, head, class name), one per model type: its causal-LM class, else seq2seq-LM, else masked-LM."""
    from transformers.models.auto import modeling_auto

    seen, out = set(), []
    for head, mapping in HEADS:
        for model_type, cls in getattr(modeling_auto, mapping).items():
            if model_type not in seen and isinstance(cls, str):
                seen.add(model_type)
                out.append((model_type, head, cls))
    return sorted(out)


def _shrink(config) -> None:
    for attr, value in SIZES.items():
        current = getattr(config, attr, None)
        if isinstance(current, int) and not isinstance(current, bool):
            try:
                setattr(config, attr, value)
            except (AttributeError, TypeError, ValueError, NotImplementedError):
                pass  # a derived or validated attribute: leave it
    layers = getattr(config, "num_hidden_layers", None)
    for attr in ("layer_types", "mlp_only_layers", "block_types", "attn_type_list"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and layers and len(value) > layers:
            setattr(config, attr, list(value)[:layers])
    for attr in TOKEN_IDS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, attr, VOCAB - 1 - TOKEN_IDS.index(attr))
        elif isinstance(value, (list, tuple)):
            setattr(config, attr, [v if v < VOCAB else VOCAB - 1 for v in value])
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False


@functools.lru_cache(maxsize=None)
def _config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    return config


def build(model_type: str, cls_name: str):
    """(model, None) or (None, reason)."""
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None, f"{cls_name} not importable (optional dependency)"
    try:
        config = _config(model_type)
    except Exception as err:  # noqa: BLE001 -- the reason is reported
        return None, f"config: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    if any(hasattr(config, sub) and getattr(config, sub) is not None and not isinstance(getattr(config, sub), (int, str))
           for sub in ("text_config", "vision_config", "audio_config")):
        return None, "composite config (text/vision/audio sub-configs): not shrunk generically"
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            size = sum(p.numel() for p in cls(config).parameters())
    except Exception as err:  # noqa: BLE001
        return None, f"build: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    if size > MAX_PARAMS:
        return None, f"not tiny after generic shrinking ({size / 1e6:.1f}M parameters: sizes under other names)"
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls(config).eval()
    except Exception as err:  # noqa: BLE001
        return None, f"build: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return model, None


# ------------------------------------------------------------------------------------------ the comparison
def _peft_names(model) -> set[str]:
    from torch import nn

    names = set()
    for n, m in model.named_modules():
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and m.lora_A:
            n = n.removeprefix("base_model.model.")
            while n.endswith(".base_layer"):
                n = n.removesuffix(".base_layer")
            names.add(n)
    return names


def _inputs(head: str, seed: int = 1) -> dict:
    ids = torch.randint(3, VOCAB - 8, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "decoder_input_ids": ids} if head == "seq2seq-lm" else {"input_ids": ids}


def _run(model, inputs, backward: bool = True):
    """(logits, [gradients at the input embedding outputs]) of ``model(**inputs)``; loss = mean(logits²)."""
    captured = []

    def hook(_module, _args, out):
        leaf = out.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()  # not the leaf itself: model code may scale the embeddings in place

    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(hook) if backward else None
    try:
        out = model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits if getattr(out, "logits", None) is not None else out[0]
    if not backward:
        return logits.detach(), []
    logits.float().square().mean().backward()
    return logits.detach(), [c.grad for c in captured]


def _close(a, b, what, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _sgd(model, lr=1e-2):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


def check_architecture(model, head: str) -> tuple[str, str]:
    """fastft all-linear LoRA against PEFT's all-linear on ``model`` (unchanged): ``("match", note)``,
    ``("refused", fastft's error)``, ``("peft-refuses", PEFT's error)``; raises AssertionError on a difference.

    Compared: the adapted set (PEFT's may hold linears outside the layer stacks, fastft's may hold fused experts and
    routers PEFT's all-linear leaves out; anything else is a difference), logits and input-embedding gradients of
    fastft against PEFT loading fastft's export, fastft against from_peft of it, one SGD step on both, merge."""
    import copy
    import tempfile

    import fastft
    import peft
    from fastft.nn import FASTFT_MODULES
    from fastft.targets import find_layer_stacks, stack_of

    base = model
    inputs = _inputs(head)
    try:
        with torch.no_grad():
            base(**inputs)
    except Exception as err:  # noqa: BLE001 -- the shrunk config does not run: not this test's business
        return "skipped", f"the tiny model does not run: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    patched = copy.deepcopy(base)
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    try:
        report = fastft.patch(patched, fastft.LoRAConfig(r=2, alpha=4))
    except (ValueError, TypeError) as err:
        changed = [k for k, v in patched.state_dict().items() if k not in before or not torch.equal(before[k], v)]
        assert not changed and not any(isinstance(m, FASTFT_MODULES) for m in patched.modules()), \
            f"partial patch after a refusal: {changed[:4]}"
        return "refused", str(err).splitlines()[0][:200]
    ours = {row.name for row in report}
    try:
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
        theirs = _peft_names(pm)
    except Exception as err:  # noqa: BLE001 -- recorded
        return "peft-refuses", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    stacks = find_layer_stacks(base)
    only_peft = sorted(theirs - ours)
    only_ours = sorted(ours - theirs)
    outside = [n for n in only_peft if stack_of(stacks, n) is None]
    assert outside == only_peft, f"PEFT also adapts, inside the stacks: {[n for n in only_peft if n not in outside][:5]}"
    moe_kinds = {"lora-experts", "lora-router"}
    extra = [row.name for row in report if row.name in only_ours and row.kind not in moe_kinds]
    assert not extra, f"fastft adapts modules PEFT does not: {extra[:5]}"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in patched.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    logits, grads = _run(patched, inputs)
    with tempfile.TemporaryDirectory() as d:
        try:
            fastft.export_peft(patched, d)
        except ValueError as err:
            if "PEFT would load this adapter differently" not in str(err):
                raise
            if "renames adapter keys on load" in str(err):
                return "export-refused", ("PEFT's load renames some adapter keys (transformers' checkpoint conversion "
                                          "for this model) so they miss their modules; export_peft refuses (the "
                                          "adapted set matches)")
            return "export-refused", ("PEFT would rename nn.Linear targets into expert parameters on load; "
                                      "export_peft refuses (the adapted set matches)")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d, is_trainable=True).eval()
        again = copy.deepcopy(base)
        fastft.from_peft(again, d)
    peft_logits, peft_grads = _run(loaded, inputs)
    _close(peft_logits, logits, "logits vs PEFT")
    assert len(grads) == len(peft_grads)
    for a, b in zip(grads, peft_grads):
        _close(a, b, "input gradients vs PEFT", atol=1e-6)
    _close(_run(again, inputs, backward=False)[0], logits, "logits after from_peft", atol=1e-6)
    pair = (copy.deepcopy(patched), copy.deepcopy(loaded))  # before the step, for the float64 re-check
    _sgd(patched)
    _sgd(loaded)
    after, _ = _run(patched, inputs, backward=False)
    notes = []
    try:
        _close(_run(loaded, inputs, backward=False)[0], after, "logits after one SGD step vs PEFT")
    except AssertionError as err:  # float32 rounding of the gradients amplified by a steep model (cpmant)?
        ours64, theirs64 = (m.double() for m in pair)
        for m in (ours64, theirs64):
            m.zero_grad(set_to_none=True)
            _run(m, inputs)
            _sgd(m)
        gap = (_run(ours64, inputs, backward=False)[0] - _run(theirs64, inputs, backward=False)[0]).abs().max()
        if gap > 1e-9:
            raise err
        after64 = _run(ours64, inputs, backward=False)[0]
        fastft.unpatch(ours64, merge=True)
        _close(_run(ours64, inputs, backward=False)[0], after64, "logits after merge (float64)", atol=1e-9, rtol=1e-9)
        patched = None  # the float32 merge check below would meet the same amplified rounding
        notes.append("the SGD step matches PEFT in float64 (max logit gap "
                     f"{gap:.0e}); float32 rounding of the gradients is amplified past the tolerance")
    if patched is not None:
        fastft.unpatch(patched, merge=True)
        _close(_run(patched, inputs, backward=False)[0], after, "logits after merge")
    if outside:
        notes.append(f"PEFT also adapts {len(outside)} outside the stacks ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in outside}))})")
    if only_ours:
        notes.append(f"fastft also adapts {len(only_ours)} MoE experts/routers")
    return "match", "; ".join(notes)


# ------------------------------------------------------------------------------------------ the support table
BEGIN, END = "<!-- zoo table: begin (python tests/plans/zoo_models.py --write) -->", "<!-- zoo table: end -->"
STATUS_TEXT = {"match": "matches PEFT", "refused": "refused at patch time", "peft-refuses": "PEFT refuses", "export-refused": "matches, export refused",
               "skipped": "not built tiny", "differs": "differs from PEFT"}


def run_all(only=None) -> list[tuple[str, str, str, str]]:
    """(model_type, head, status, note) for every zoo entry (status: a key of STATUS_TEXT)."""
    rows = []
    for model_type, head, cls in zoo_entries():
        if only and model_type not in only:
            continue
        model, why = build(model_type, cls)
        if model is None:
            rows.append((model_type, head, "skipped", why))
            print("skipped", model_type, why, flush=True)
            continue
        try:
            status, note = check_architecture(model, head)
        except Exception as err:  # noqa: BLE001 -- a difference, recorded
            status, note = "differs", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append((model_type, head, status, note))
        print(status, model_type, note, flush=True)
    return rows


def render(rows) -> str:
    import transformers

    counts = {s: sum(1 for r in rows if r[2] == s) for s in STATUS_TEXT}
    built = len(rows) - counts["skipped"]
    lines = [BEGIN, "",
             f"transformers {transformers.__version__}: {len(rows)} model types with a causal-LM, seq2seq-LM or "
             f"masked-LM class; **{built} built tiny**, of which **{counts['match']} match PEFT**, "
             f"{counts['export-refused']} match but export_peft refuses (PEFT's load-time MoE rename), "
             f"{counts['refused']} are refused at patch time (with the reason), {counts['peft-refuses']} are refused "
             f"by PEFT's all-linear, {counts['differs']} differ; {counts['skipped']} are not built tiny (reason given).",
             "", "| model type | class | result | note |", "|---|---|---|---|"]
    for model_type, head, status, note in rows:
        note = note.replace("|", "/").replace("\n", " ")
        lines.append(f"| `{model_type}` | {head} | {STATUS_TEXT[status]} | {note} |")
    lines += ["", END]
    return "\n".join(lines)


def table_rows(path: str) -> list[tuple[str, str, str, str]]:
    """The rows docs/support.md holds now (to update some of them)."""
    import re

    back = {text: status for status, text in STATUS_TEXT.items()}
    section = open(path).read().split(BEGIN, 1)[1].split(END, 1)[0]
    found = re.findall(r"^\| `([^`]+)` \| ([\w-]+) \| ([^|]+) \| (.*) \|$", section, flags=re.M)
    return [(m, h, back[r.strip()], n) for m, h, r, n in found]


def write(path: str, rows, update: bool = False) -> None:
    if update:  # re-ran some entries: keep the others' rows
        fresh = {r[0]: r for r in rows}
        rows = [fresh.pop(r[0], r) for r in table_rows(path)] + list(fresh.values())
    text = open(path).read()
    table = render(rows)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Every architecture transformers can build tiny\n\n" + table + "\n"
    open(path, "w").write(text)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    target = args[args.index("--write") + 1] if "--write" in args else None
    result = run_all([a for a in args if not a.startswith("--") and a != target] or None)
    if target:
        write(target, result, update="--update" in args)
    else:
        print(render(result))
