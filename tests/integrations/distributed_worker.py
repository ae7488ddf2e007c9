"""Run by tests/integrations/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU), in one launch:

1. fastft's functions on FSDP2-sharded and DDP-wrapped models; prints ``CHECK <name> ok`` per check on
   rank 0 (any failure raises);
2. FSDP2 training through the copyable example's ``train`` (``fastft.examples.train_distributed``, engine
   ``fsdp2``), once per dtype given: after a line ``=== <dtype>``, the example's own output.

    torchrun --nproc_per_node 2 tests/integrations/distributed_worker.py OUT float32=lora,dora bfloat16=lora -- <example args>
"""
from __future__ import annotations

import copy
import gc
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import randomize_lora, tiny_model  # noqa: E402

import fastft  # noqa: E402
from fastft.nn import DoRALinear  # noqa: E402
from fastft.patch import build_report  # noqa: E402


def check(name: str) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"CHECK {name} ok", flush=True)


def expect_error(fn, *fragments: str) -> None:
    try:
        fn()
    except ValueError as error:
        message = str(error)
        missing = [f for f in fragments if f not in message]
        assert not missing, f"error message lacks {missing}: {message}"
        return
    raise AssertionError(f"{fn} did not raise")


def shard(model) -> None:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def patched_dora(seed: int):
    model = tiny_model("llama", torch.float32)
    torch.manual_seed(seed)
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8, dora=True))
    randomize_lora(model, seed=seed)  # B non-zero, so the magnitude is not just the row norms
    return model


def equal_dicts(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def main(out: str, runs: list[str], example_args: list[str]) -> None:
    dist.init_process_group("gloo")
    api_checks(out)
    from fastft.examples import train_distributed

    for run in runs:
        dtype, methods = run.split("=")
        args = train_distributed.parse_args(["--engine", "fsdp2", "--method", methods, "--dtype", dtype,
                                             "--out", os.path.join(out, dtype), *example_args])
        train_distributed.say(f"=== {dtype}")
        for method in args.methods:
            train_distributed.train(args, method)
    gc.collect()  # no DDP module may outlive the process group (see the example's main)
    dist.barrier()
    dist.destroy_process_group()


def api_checks(out: str) -> None:
    rank = dist.get_rank()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))

    # FSDP2: the adapters become DTensors sharded on dim 0; DoRA's cached norms stay whole buffers
    model = patched_dora(seed=1)
    plain = copy.deepcopy(model)
    shard(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoRALinear) and fastft.distributed.is_sharded(layer.lora_A)
    assert layer.lora_A.to_local().shape[0] == 2  # r=4 split over two ranks
    assert not fastft.distributed.is_sharded(layer.weight_sq_norm)
    torch.testing.assert_close(layer.weight_sq_norm, plain.model.layers[0].self_attn.q_proj.weight_sq_norm,
                               rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    check("fsdp2 shards adapters, keeps DoRA norms whole, same logits")

    # adapter_state_dict / save gather the full tensors; only rank 0 writes
    expected = fastft.adapter_state_dict(plain)
    equal_dicts(fastft.adapter_state_dict(model), expected, "gathered adapters")
    fastft.save(model, os.path.join(out, f"saved-by-rank{rank}"))
    dist.barrier()
    if rank == 0:
        assert os.path.isdir(os.path.join(out, "saved-by-rank0"))
        assert not os.path.exists(os.path.join(out, "saved-by-rank1"))
        on_disk = load_file(os.path.join(out, "saved-by-rank0", "fastft_adapter.safetensors"))
        equal_dicts(on_disk, expected, "saved adapters")
    check("save gathers sharded adapters, rank 0 writes")

    # load onto another sharded model (different adapters): each rank copies its shard
    other = patched_dora(seed=7)
    shard(other)
    fastft.load(other, os.path.join(out, "saved-by-rank0"))
    equal_dicts(fastft.adapter_state_dict(other), expected, "loaded adapters")
    assert fastft.distributed.is_sharded(other.model.layers[0].self_attn.q_proj.lora_magnitude_vector)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, plain(input_ids=ids).logits)
    check("load onto a sharded model")

    # export_peft from the sharded model equals the export from the unsharded one
    fastft.export_peft(model, os.path.join(out, "peft-sharded"))
    if rank == 0:
        fastft.export_peft(plain, os.path.join(out, "peft-plain"))
        equal_dicts(load_file(os.path.join(out, "peft-sharded", "adapter_model.safetensors")),
                    load_file(os.path.join(out, "peft-plain", "adapter_model.safetensors")), "PEFT export")
    check("export_peft gathers sharded adapters")

    # refused with a clear error: patching a sharded or DDP-wrapped model, unpatching a sharded one
    bare = tiny_model("llama", torch.float32)
    shard(bare)
    expect_error(lambda: fastft.patch(bare, fastft.LoRAConfig(r=4)), "sharded by FSDP", "fastft.patch(model, config)")
    expect_error(lambda: fastft.unpatch(model), "sharded by FSDP", "fastft.load(plain_model, dir)")
    assert fastft.is_patched(model)  # nothing was undone
    wrapped = torch.nn.parallel.DistributedDataParallel(tiny_model("llama", torch.float32))
    expect_error(lambda: fastft.patch(wrapped, fastft.LoRAConfig(r=4)), "DistributedDataParallel",
                 "model = DDP(model)")
    # S²FT trains a view of the frozen weight, which FSDP would shard apart from it: refused at the forward
    # (a slice of whole rows/columns is contiguous, so fully_shard itself accepts it)
    s2ft = tiny_model("llama", torch.float32)
    fastft.patch(s2ft, fastft.S2FTConfig(ffn_ratio=1.0, attn_ratio=1.0))
    shard(s2ft)
    try:
        s2ft(input_ids=ids)
    except RuntimeError as error:
        assert "S²FT under FSDP" in str(error) and "DDP" in str(error), error
    else:
        raise AssertionError("S²FT under FSDP2 ran")
    check("patch after wrapping, unpatch of a sharded model, S²FT under FSDP: refused")

    # DDP: the functions look through the wrapper
    model = patched_dora(seed=1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert fastft.is_patched(ddp)
    assert build_report(ddp).model == "LlamaForCausalLM" and len(build_report(ddp)) == 14
    equal_dicts(fastft.adapter_state_dict(ddp), expected, "DDP adapters")
    fastft.save(ddp, os.path.join(out, "ddp"))
    assert fastft.unpatch(ddp, merge=True) is model and not fastft.is_patched(model)
    check("DDP: save and unpatch through the wrapper")


if __name__ == "__main__":
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    main(sys.argv[1], sys.argv[2:split], sys.argv[split + 1:])
