"""Train a fastft-patched causal LM on several processes: DDP or FSDP2, launched with torchrun or accelerate.

fastft adds no engine: the model is patched first, then handed to the engine you already use. Launch::

    # one process (the reference: the same global batch, unsplit)
    python -m fastft.examples.train_distributed --method lora

    # torchrun: DDP, or FSDP2 (torch.distributed.fsdp.fully_shard on every decoder layer, then the root)
    torchrun --nproc_per_node 2 -m fastft.examples.train_distributed --engine ddp --method lora
    torchrun --nproc_per_node 2 -m fastft.examples.train_distributed --engine fsdp2 --method dora

    # accelerate: DDP, or its FSDP2 plugin
    accelerate launch --multi_gpu --num_processes 2 -m fastft.examples.train_distributed --engine accelerate
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --num_processes 2 -m fastft.examples.train_distributed --engine accelerate --method dora

(on a machine without GPUs every process runs on the CPU with the gloo backend; see ``make_accelerator``).
Each step takes one global batch of ``--batch`` sequences and gives each of the N ranks its contiguous
slice of ``--batch / N``; the loss is the mean over tokens, so the averaged gradient, and therefore the
trained adapter, equals a one-process run over the whole batch (up to float summation order). At the end
every rank prints a fingerprint of its (full) adapters and rank 0 writes them with ``fastft.save`` to
``--out/<method>``.

``--model`` takes a Hugging Face model name or directory; the default, ``tiny-llama``, builds a small random
Llama so the script runs anywhere in seconds. The data are made up (arithmetic progressions of token ids):
put your own loader in ``global_batches`` (in your script: a ``DataLoader`` with a ``DistributedSampler``, or
``accelerator.prepare(dataloader)``). ``--method`` may list several methods (``lora,dora``), trained one
after the other from the same start.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

import fastft

METHODS = ("lora", "dora", "qat-lora", "loss", "full-loss", "s2ft")
ENGINES = ("ddp", "fsdp2", "accelerate")


def method_configs(method: str) -> list:
    """The fastft configs of a ``--method`` name."""
    lora = fastft.LoRAConfig(r=8, alpha=16)
    if method == "lora":
        return [lora]
    if method == "dora":
        return [fastft.LoRAConfig(r=8, alpha=16, dora=True)]
    if method == "qat-lora":  # W4A8 fake quantization with Hadamard rotations, LoRA trains
        return [fastft.QATConfig(w_bits=4, a_bits=8), lora]
    if method == "loss":  # LoRA trained through the fused linear cross-entropy (no logits in memory)
        return [lora, fastft.LossConfig(kind="ce")]
    if method == "s2ft":  # S²FT: a tenth of the FFN channels and a quarter of the heads train in place (DDP only)
        return [fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.25, selection="random")]
    if method == "full-loss":  # full fine-tuning (every weight trains) through the fused loss
        return [fastft.LossConfig(kind="ce")]
    raise ValueError(f"--method {method!r}: choose from {METHODS}")


def build_model(name: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """The same model on every rank: from a checkpoint, or a small random Llama built from ``seed``."""
    import transformers

    if name != "tiny-llama":
        return transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def global_batches(steps: int, batch: int, seq: int, vocab: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` global batches of token ids (batch×seq), the same on every rank: drawn from a fixed pool of
    arithmetic progressions modulo the vocabulary (random start and stride), something a model can learn."""
    generator = torch.Generator().manual_seed(seed)
    pool = 4 * batch
    start = torch.randint(0, vocab, (pool, 1), generator=generator)
    stride = torch.randint(1, 8, (pool, 1), generator=generator)
    sequences = (start + stride * torch.arange(seq)) % vocab
    for _ in range(steps):
        yield sequences[torch.randperm(pool, generator=generator)[:batch]]


def shard_layers(model: nn.Module) -> None:
    """FSDP2: shard each decoder layer (transformers names their classes in ``_no_split_modules``), then the
    root, which holds the embeddings, the final norm and lm_head."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer classes in _no_split_modules")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def make_accelerator():
    """An ``accelerate.Accelerator`` for this launch.

    accelerate runs CPU-only processes as ``MULTI_CPU`` (gloo) when asked with ``cpu=True``, but it enables its
    FSDP plugin only on GPU-like devices. On a machine without GPUs, when launched with ``--use_fsdp``, the
    accelerator is switched to its FSDP mode here so that ``prepare`` runs accelerate's own FSDP2 code
    (``fully_shard`` per its wrap policy) on the CPU; on GPUs nothing is changed.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # what AcceleratorState does for FSDP on a GPU: the plugin from the launcher's FSDP_* variables, and the
        # distributed type in both shared states (a later AcceleratorState() copies PartialState's)
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.state.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.state.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def say(text) -> None:
    """One line to stdout in one write: lines of several ranks sharing a terminal or pipe do not interleave."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def describe_engine(model: nn.Module) -> str:
    """What runs the model: DDP, FSDP2 (how many ``fully_shard`` units, whether the adapters are sharded), or
    one process."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units:
        sharded = [p for p in model.parameters() if p.requires_grad and fastft.distributed.is_sharded(p)]
        return f"FSDP2: {len(units)} fully_shard units, {len(sharded)} trainable tensors sharded (DTensor)"
    return "one process"


def trained_tensors(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """("adapters", ``fastft.adapter_state_dict``), or ("weights", every trainable weight) when the method trains
    the model itself; whole tensors (sharded ones are gathered: call on every rank)."""
    tensors = fastft.adapter_state_dict(model)
    if tensors:
        return "adapters", tensors
    inner = fastft.distributed.unwrap(model)
    return "weights", {name: fastft.distributed.full_tensor(p.detach()).cpu()
                       for name, p in inner.named_parameters() if p.requires_grad}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short sha256 of the tensors' names and bytes: equal on two ranks iff their tensors are bit-identical."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        digest.update(key.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def train(args: argparse.Namespace, method: str, accelerator=None) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be a multiple of the number of processes ({world})")
    dtype = getattr(torch, args.dtype)
    device = accelerator.device if accelerator is not None else local_device()
    model = build_model(args.model, dtype, args.seed).to(device).train()
    torch.manual_seed(args.seed + 1)  # the same seed on every rank: the adapters start equal
    report = fastft.patch(model, method_configs(method))  # 1. patch the plain model ...
    if rank == 0:
        say(report)

    optimizer_class = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[args.optimizer]
    params = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    if args.engine == "accelerate":  # 2. ... then wrap or shard it
        optimizer = optimizer_class(params(), lr=args.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        if args.engine == "ddp" and world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        elif args.engine == "fsdp2" and world > 1:
            shard_layers(model)
        optimizer = optimizer_class(params(), lr=args.lr)  # after sharding: FSDP2 replaced the parameters

    if rank == 0:
        say(f"{method} engine: {describe_engine(model)}")
    per_rank = args.batch // world
    vocab = fastft.distributed.unwrap(model).config.vocab_size
    for step, batch in enumerate(global_batches(args.steps, args.batch, args.seq, vocab, args.seed + 2)):
        ids = batch[rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        shown = loss.detach().clone()
        if world > 1:
            dist.all_reduce(shown)
            shown /= world
        if rank == 0:
            say(f"{method} step {step}: loss {shown.item():.6f}")

    kind, tensors = trained_tensors(model)
    say(f"{method} rank {rank}: {kind} {fingerprint(tensors)}")
    if args.out and kind == "adapters":
        fastft.save(model, os.path.join(args.out, method))  # every rank calls it; rank 0 writes
        if rank == 0:
            say(f"{method}: saved to {os.path.join(args.out, method)}")


def local_device() -> torch.device:
    """This process's GPU under torchrun (``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=ENGINES, default="ddp",
                        help="ddp / fsdp2: torch.distributed under torchrun; accelerate: accelerator.prepare under "
                             "accelerate launch (DDP, or FSDP2 with --use_fsdp --fsdp_version 2). Ignored on one process "
                             "unless accelerate.")
    parser.add_argument("--method", default="lora",
                        help=f"one or several (comma-separated) of {', '.join(METHODS)}")
    parser.add_argument("--model", default="tiny-llama", help="a Hugging Face model name or directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"),
                        help="dtype of the base model (adapters over a half base are float32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step, all ranks together)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory: rank 0 writes fastft.save(model, OUT/<method>)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--method {args.method!r}: choose from {METHODS}")
    args.methods = methods
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = None
    if args.engine == "accelerate":
        accelerator = make_accelerator()  # sets up the process group from the launcher's environment
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    for method in args.methods:
        train(args, method, accelerator)
    if dist.is_initialized():
        # Drop every DDP module before destroying the process group: with gloo, torch 2.13 processes that
        # destroy it while a DDP module is alive abort at exit now and then ("terminate called without an
        # active exception"). accelerate holds the prepared models until free_memory().
        if accelerator is not None:
            accelerator.free_memory()
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
