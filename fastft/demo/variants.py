"""The two variants the demo trains side by side: fastft LoRA and PEFT LoRA with the same initial adapters."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

import fastft

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A, lora_B)


@dataclass(frozen=True)
class LoRASetup:
    rank: int
    alpha: float
    layers: tuple[int, ...] | None  # decoder-layer indices (None: all)

    # a Llama decoder layer's linear layers: "all-linear" by name (PEFT takes layers_to_transform only with a list)
    LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def targets(self):
        return "all-linear" if self.layers is None else list(self.LLAMA_LINEARS)

    def fastft_config(self) -> fastft.LoRAConfig:
        return fastft.LoRAConfig(r=self.rank, alpha=self.alpha, targets=self.targets(),
                                 layers=list(self.layers) if self.layers is not None else None)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=self.targets(),
                          layers_to_transform=list(self.layers) if self.layers is not None else None)


def new_fastft_model(base, lora: LoRASetup, adapters: Adapters | None = None):
    """A copy of ``base`` patched with fastft LoRA (initial adapters copied in if given); ``(model, report)``."""
    model = copy.deepcopy(base)
    report = fastft.patch(model, lora.fastft_config())
    if adapters is not None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, fastft.nn.LoRALinear):
                    module.lora_A.copy_(adapters[name][0])
                    module.lora_B.copy_(adapters[name][1])
    return model, report


def fastft_adapters(model) -> Adapters:
    return {
        name: (module.lora_A.detach().clone(), module.lora_B.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, fastft.nn.LoRALinear)
    }


def new_peft_model(base, lora: LoRASetup, adapters: Adapters):
    """A copy of ``base`` wrapped in PEFT LoRA of the same config, its adapters set to ``adapters``."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), lora.peft_config())
    inner = peft_model.get_base_model()
    adapted = {name for name, m in inner.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    if adapted != set(adapters):
        raise RuntimeError(
            "fastft and PEFT adapted different modules: only fastft "
            f"{sorted(set(adapters) - adapted)[:4]}, only PEFT {sorted(adapted - set(adapters))[:4]}"
        )
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapters.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
    return peft_model


class Trainer:
    """AdamW on the trainable parameters of a causal LM; ``step(ids)`` returns the loss."""

    def __init__(self, model, lr: float):
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self, ids: torch.Tensor) -> float:
        self.model.train()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over ``windows`` (rows of token ids), weighted by predicted tokens."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        n = chunk.numel() - chunk.shape[0]
        total += model(input_ids=chunk, labels=chunk).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def greedy_continuation(model, prompt_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The ``new_tokens`` token ids greedy decoding appends to ``prompt_ids`` (1-D)."""
    model.eval()
    ids = prompt_ids.view(1, -1)
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=None if getattr(model.config, "pad_token_id", None) is not None else 0)
    return out[0, ids.shape[1]:].tolist()


@dataclass
class TrainingRun:
    losses: dict[str, list[float]]
    step_seconds: dict[str, list[float]]  # timed steps only (see train_interleaved)
    peak_live_bytes: dict[str, int] = field(default_factory=dict)


def train_interleaved(trainers: dict[str, Trainer], batches: Sequence[torch.Tensor], peak_live_bytes,
                      progress=None) -> TrainingRun:
    """Train every variant on the same batches, alternating step by step (the order flips each step).

    Step 1 creates the optimizer state and is not timed; step 2 runs under ``peak_live_bytes`` (the
    allocator profiler, whose overhead would distort its time) and is not timed either. The other steps'
    wall times are kept.
    """
    names = list(trainers)
    run = TrainingRun({n: [] for n in names}, {n: [] for n in names})
    for index, ids in enumerate(batches):
        for name in names if index % 2 == 0 else names[::-1]:
            trainer = trainers[name]
            if index == 1:
                losses = []
                run.peak_live_bytes[name] = peak_live_bytes(lambda: losses.append(trainer.step(ids)))
                run.losses[name].append(losses[0])
            else:
                start = time.perf_counter()
                run.losses[name].append(trainer.step(ids))
                if index > 0:
                    run.step_seconds[name].append(time.perf_counter() - start)
            if progress is not None:
                progress.update(1)
    return run
