"""``python -m fastft.demo``: fine-tune a small Llama with fastft LoRA and with PEFT LoRA, side by side.

What it does, all on the CPU, nothing downloaded:

1. builds a small ``LlamaForCausalLM`` from ``transformers.LlamaConfig`` with random weights (the frozen
   base) and generates the training data: sentences of a synthetic language whose grammar lets each word
   be followed by exactly two words (a fixed random table), so the best possible loss is ln 2 ≈ 0.693 and
   the loss visibly falls from about ln(vocab) as LoRA learns the grammar;
2. patches a copy with ``fastft.patch(model, fastft.LoRAConfig(r=16))`` (every linear layer of the decoder
   layers), prints the patch report, and trains the adapters with AdamW;
3. trains PEFT's LoRA on another copy with the same config (``target_modules="all-linear"``), the same
   initial adapter weights (copied from fastft's) and the same batches in the same order;
4. prints the two loss curves side by side with their largest difference, the median step time, the peak
   live tensor bytes of one training step and the process's peak resident memory, for both;
5. saves fastft's adapter with ``fastft.export_peft`` and reloads it with ``peft.PeftModel.from_pretrained``
   on a fresh base: the logits must match those of the fastft model.

Flags: ``--steps`` (default 40), ``--seq-len``, ``--batch``, ``--lr``, ``--quick`` (a tiny model and a few
steps, for tests). Without PEFT installed, the fastft half runs alone and says how to install PEFT.

Measurements: the step time is wall time of forward + backward + optimizer step (the first step, which
creates the optimizer state, and the profiled step are left out of the median). "Peak live tensors" is
the peak increase of bytes held by PyTorch tensors during one training step, from allocator events
(``benchmarks.measure.peak_live_bytes``; available when the fastft repository is checked out). "Peak RSS"
is the process's high-water resident set size during the run (Linux: reset at the start of each run by
writing 5 to /proc/self/clear_refs; it includes Python, the libraries and the base model).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import fastft

from .process_memory import peak_rss as _peak_rss
from .process_memory import proc_status_bytes as _proc_status_bytes
from .process_memory import release_freed_memory as _release_freed_memory
from .process_memory import reset_peak_rss as _reset_peak_rss

PEFT_INSTALL_HINT = 'PEFT is not installed, so the comparison with PEFT is skipped. Install it with: pip install "fastft[peft]"'


@dataclass(frozen=True)
class DemoSetup:
    """Sizes of the model, the language and the training run."""

    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 512
    words: int = 48  # the language uses token ids 1..words; 0 starts every sentence
    successors: int = 2  # each word can be followed by this many words
    init_std: float = 0.06  # weight init of the random base (LlamaConfig.initializer_range)
    seq_len: int = 128
    batch: int = 16
    steps: int = 40
    lr: float = 5e-3
    rank: int = 16
    alpha: float = 32
    seed: int = 0


FULL = DemoSetup()
QUICK = DemoSetup(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=96, words=16,
                  seq_len=32, batch=4, steps=4, lr=1e-2, rank=8, alpha=16)


# ------------------------------------------------------------------------------------ model and data
def build_base_model(setup: DemoSetup):
    """A random ``LlamaForCausalLM`` of the demo's size (deterministic given ``setup.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        max_position_embeddings=setup.seq_len,
        initializer_range=setup.init_std,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(setup.seed)
    return LlamaForCausalLM(config)


def make_grammar(setup: DemoSetup) -> torch.Tensor:
    """``table[w]``: the ``successors`` distinct words that may follow word ``w`` (row 0: after the start)."""
    gen = torch.Generator().manual_seed(setup.seed + 1)
    table = torch.zeros(setup.words + 1, setup.successors, dtype=torch.long)
    for word in range(1, setup.words + 1):
        table[word] = torch.randperm(setup.words, generator=gen)[: setup.successors] + 1
    return table


def make_batches(setup: DemoSetup) -> list[torch.Tensor]:
    """``steps`` batches of sentences (batch × seq_len token ids): 0, a random word, then grammar walks."""
    table = make_grammar(setup)
    gen = torch.Generator().manual_seed(setup.seed + 2)
    batches = []
    for _ in range(setup.steps):
        ids = torch.zeros(setup.batch, setup.seq_len, dtype=torch.long)
        ids[:, 1] = torch.randint(1, setup.words + 1, (setup.batch,), generator=gen)
        choices = torch.randint(0, setup.successors, (setup.batch, setup.seq_len), generator=gen)
        for position in range(2, setup.seq_len):
            ids[:, position] = table[ids[:, position - 1], choices[:, position]]
        batches.append(ids)
    return batches


# ------------------------------------------------------------------------------------ memory probes
def _load_measure_helpers():
    """``benchmarks.measure`` from the fastft repository (importable from its root, or found beside fastft)."""
    try:
        from benchmarks import measure

        return measure
    except ImportError:
        pass
    path = Path(fastft.__file__).resolve().parents[1] / "benchmarks" / "measure.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("fastft_repo_benchmarks_measure", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------ the two variants
Adapters = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A, lora_B)


def _fresh_base(setup: DemoSetup, base_state: dict):
    model = build_base_model(setup)
    model.load_state_dict(base_state)
    return model


def patch_with_fastft(model, setup: DemoSetup, adapters: Adapters | None = None):
    """Patch ``model`` in place with fastft LoRA of the demo's config (initial adapters copied in if given).

    Returns the patch report. ``model`` may hold bitsandbytes ``Linear4bit`` layers (QLoRA).
    """
    report = fastft.patch(model, fastft.LoRAConfig(r=setup.rank, alpha=setup.alpha, targets="all-linear"))
    if adapters is not None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, fastft.nn.LoRALinear):
                    module.lora_A.copy_(adapters[name][0])
                    module.lora_B.copy_(adapters[name][1])
    return report


def new_fastft_model(setup: DemoSetup, base_state: dict, adapters: Adapters | None = None):
    """The base patched with fastft LoRA (initial adapters copied in if given); returns (model, report)."""
    model = _fresh_base(setup, base_state)
    return model, patch_with_fastft(model, setup, adapters)


def fastft_adapters(model) -> Adapters:
    """A copy of every fastft LoRA module's (A, B)."""
    return {
        name: (module.lora_A.detach().clone(), module.lora_B.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, fastft.nn.LoRALinear)
    }


def patch_with_peft(model, setup: DemoSetup, adapters: Adapters):
    """``model`` wrapped in PEFT LoRA of the same config, its adapters set to ``adapters``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(
            model,
            LoraConfig(r=setup.rank, lora_alpha=setup.alpha, lora_dropout=0.0, target_modules="all-linear"),
        )
    base = peft_model.get_base_model()
    adapted = {name for name, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    if adapted != set(adapters):
        raise RuntimeError(
            "fastft and PEFT adapted different modules: only fastft "
            f"{sorted(set(adapters) - adapted)[:4]}, only PEFT {sorted(adapted - set(adapters))[:4]}"
        )
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapters.items():
            layer = base.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
    return peft_model


def new_peft_model(setup: DemoSetup, base_state: dict, adapters: Adapters):
    """The base with PEFT LoRA of the same config, its adapters set to ``adapters``."""
    return patch_with_peft(_fresh_base(setup, base_state), setup, adapters)


class Trainer:
    """AdamW on the trainable parameters of a causal LM; ``step(ids)`` returns the loss."""

    def __init__(self, model, lr: float):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self, ids: torch.Tensor) -> float:
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


@torch.no_grad()
def probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


# ------------------------------------------------------------------------------------ measuring
@dataclass
class MemoryResult:
    peak_live_bytes: int | None  # one steady-state training step (the second)
    rss_at_start: int
    peak_rss: int
    peak_rss_was_reset: bool


def measure_memory(make_model: Callable[[], object], batches: list[torch.Tensor], lr: float, measure) -> MemoryResult:
    """Build one variant alone and train it two steps: peak RSS over it all, peak live bytes of step 2."""
    _release_freed_memory()
    rss_at_start = _proc_status_bytes("VmRSS") or 0
    was_reset = _reset_peak_rss()
    trainer = Trainer(make_model(), lr)
    trainer.step(batches[0])  # creates the optimizer state
    second = batches[1 % len(batches)]
    peak_live = None
    if measure is not None:
        peak_live = measure.peak_live_bytes(lambda: trainer.step(second))
    else:
        trainer.step(second)
    peak_rss = _peak_rss()
    del trainer
    _release_freed_memory()
    return MemoryResult(peak_live, rss_at_start, peak_rss, was_reset)


@dataclass
class TrainingResult:
    losses: dict[str, list[float]]
    step_seconds: dict[str, list[float]]  # from the second step on (the first creates optimizer state)

    def median_step_seconds(self, name: str) -> float:
        return statistics.median(self.step_seconds[name]) if self.step_seconds[name] else float("nan")


def train_interleaved(trainers: dict[str, Trainer], batches: list[torch.Tensor]) -> TrainingResult:
    """Train every variant on the same batches, alternating step by step (the order flips each step), so
    a change in the machine's load affects all of them alike."""
    names = list(trainers)
    result = TrainingResult({n: [] for n in names}, {n: [] for n in names})
    for index, ids in enumerate(batches):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            result.losses[name].append(trainers[name].step(ids))
            if index > 0:
                result.step_seconds[name].append(time.perf_counter() - start)
    return result


# ------------------------------------------------------------------------------------ printing
def format_curves(losses: dict[str, list[float]], every: int) -> str:
    """The loss of each variant every ``every`` steps (and the last), with |fastft - PEFT|."""
    steps = len(losses["fastft"])
    shown = sorted({*range(0, steps, every), steps - 1})
    with_peft = "PEFT" in losses
    lines = [f"{'step':>5}  {'fastft loss':>11}" + (f"  {'PEFT loss':>11}  {'|diff|':>9}" if with_peft else "")]
    for i in shown:
        line = f"{i + 1:>5}  {losses['fastft'][i]:>11.5f}"
        if with_peft:
            diff = abs(losses["fastft"][i] - losses["PEFT"][i])
            line += f"  {losses['PEFT'][i]:>11.5f}  {diff:>9.2e}"
        lines.append(line)
    return "\n".join(lines)


def format_costs(training: TrainingResult, memory: dict[str, MemoryResult]) -> str:
    """Step time and memory of each variant side by side (and fastft/PEFT when both ran)."""
    names = list(memory)
    rows = [
        ("median step time", [training.median_step_seconds(n) for n in names], lambda v: f"{v * 1e3:.1f} ms"),
        ("peak live tensors, one step", [memory[n].peak_live_bytes for n in names], _mib),
        ("peak RSS of the process", [memory[n].peak_rss for n in names], _mib),
        ("  added by this variant", [memory[n].peak_rss - memory[n].rss_at_start for n in names], _mib),
    ]
    header = names + (["fastft/PEFT"] if len(names) == 2 else [])
    width = max(len(label) for label, _, _ in rows)
    lines = ["".ljust(width) + "".join(f"  {n:>13}" for n in header)]
    for label, values, fmt in rows:
        cells = [fmt(v) if v is not None else "n/a" for v in values]
        if len(values) == 2:
            a, b = values
            cells.append(f"{a / b:.2f}x" if a is not None and b and not math.isnan(a / b) else "-")
        lines.append(label.ljust(width) + "".join(f"  {c:>13}" for c in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> tuple[DemoSetup, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m fastft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds; used by the tests)")
    parser.add_argument("--steps", type=int, help=f"training steps (default {FULL.steps}; quick {QUICK.steps})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per sentence (default {FULL.seq_len})")
    parser.add_argument("--batch", type=int, help=f"sentences per step (default {FULL.batch})")
    parser.add_argument("--lr", type=float, help=f"AdamW learning rate (default {FULL.lr})")
    parser.add_argument("--no-peft", action="store_true", help="run the fastft half only")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    overrides = {"steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if setup.steps < 1 or setup.seq_len < 3 or setup.batch < 1:
        parser.error("--steps and --batch must be >= 1 and --seq-len >= 3")
    return setup, args


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it printed (losses, differences, costs) for programmatic use."""
    setup, args = parse_args(argv)
    with_peft = not args.no_peft and importlib.util.find_spec("peft") is not None
    if with_peft:
        import peft  # noqa: F401  (imported before anything is measured, so it weighs on both variants alike)
    measure = _load_measure_helpers()
    s = setup
    print(f"fastft demo: LoRA fine-tuning of a small Llama on the CPU ({torch.get_num_threads()} threads), "
          f"fastft{' vs PEFT' if with_peft else ''}")
    print(f"model: hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, {s.heads} heads / "
          f"{s.kv_heads} KV heads, vocab {s.vocab}; random frozen base (init std {s.init_std})")
    print(f"data: a synthetic language of {s.words} words in which each word is followed by one of "
          f"{s.successors} words (a fixed random grammar); the best possible loss is about ln {s.successors} = "
          f"{math.log(s.successors):.3f}")
    print(f"training: {s.steps} steps of {s.batch} x {s.seq_len} tokens, AdamW lr {s.lr}, LoRA r={s.rank} "
          f"alpha={s.alpha} on every linear layer of the decoder layers")
    if not with_peft:
        print("--no-peft: the comparison with PEFT is skipped." if args.no_peft else PEFT_INSTALL_HINT)
    if measure is None:
        print("note: benchmarks/measure.py (fastft repository) was not found: peak live tensor bytes are skipped.")
    print()

    base_state = {k: v.clone() for k, v in build_base_model(setup).state_dict().items()}
    batches = make_batches(setup)

    # fastft's initial adapters (A Kaiming-uniform, B zero) are the ones every run starts from
    probe_model, report = new_fastft_model(setup, base_state)
    print(report)
    adapters = fastft_adapters(probe_model)
    del probe_model

    makers = {"fastft": lambda: new_fastft_model(setup, base_state, adapters)[0]}
    if with_peft:
        makers["PEFT"] = lambda: new_peft_model(setup, base_state, adapters)
    # memory: each variant alone in the process, two training steps; the first pass is a warm-up (lazy
    # imports, allocator and profiler start-up would otherwise be charged to whichever variant runs first)
    for _ in range(2):
        memory = {name: measure_memory(make, batches, setup.lr, measure) for name, make in makers.items()}
    # training: both variants from the same start, the same batches, steps interleaved
    trainers = {name: Trainer(make(), setup.lr) for name, make in makers.items()}
    training = train_interleaved(trainers, batches)

    summary: dict = {"setup": setup, "losses": training.losses, "training": training, "memory": memory}
    print()
    print("loss curves (same base weights, same initial adapters, same batches in the same order):")
    print(format_curves(training.losses, every=max(1, setup.steps // 10)))
    if with_peft:
        max_diff = max(abs(a - b) for a, b in zip(training.losses["fastft"], training.losses["PEFT"]))
        print(f"max |fastft loss - PEFT loss| over {setup.steps} steps: {max_diff:.3e}")
        summary["max_loss_diff"] = max_diff
    print()
    print("cost per training step (forward + backward + AdamW; times: median of steps 2.., steps interleaved):")
    print(format_costs(training, memory))
    if not all(m.peak_rss_was_reset for m in memory.values()):
        print("note: the peak RSS could not be reset between variants: each figure is the process's peak so far.")
    print()

    fastft_model = trainers["fastft"].model
    probe_ids = batches[0][:2]
    fastft_logits = probe_logits(fastft_model, probe_ids)
    with tempfile.TemporaryDirectory(prefix="fastft-demo-") as adapter_dir:
        fastft.export_peft(fastft_model, adapter_dir)
        if with_peft:
            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                reloaded = PeftModel.from_pretrained(_fresh_base(setup, base_state), adapter_dir)
            logits_diff = (fastft_logits - probe_logits(reloaded, probe_ids)).abs().max().item()
            print(f"adapter saved with fastft.export_peft and loaded with peft.PeftModel.from_pretrained on a fresh "
                  f"base: max |logits difference| vs the fastft model = {logits_diff:.3e} "
                  f"({tuple(fastft_logits.shape)} logits)")
            summary["logits_max_diff"] = logits_diff
        else:
            print('adapter saved with fastft.export_peft; loading it in PEFT needs PEFT (pip install "fastft[peft]").')
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
