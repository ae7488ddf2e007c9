"""transformers Trainer with fastft.integrations.FastFTCallback: the report, Chain of LoRA inside a real run
(function unchanged at each merge, fresh optimizer state), the re-selection hook; and fastft.patch on PEFT models."""
import copy

import pytest
import torch
from helpers import TOLERANCES, TokenData, tiny_model

import fastft
from fastft.integrations import FastFTCallback, reselect_trainable
from fastft.nn import LoRALinear

transformers = pytest.importorskip("transformers")

PROBE = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


def trainer_for(model, tmp_path, callbacks, steps=5, accumulation=1):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=TokenData(n=24, length=12), callbacks=callbacks)


class Probe(transformers.TrainerCallback):
    """Records, after each optimizer step, the probe logits and which adapters hold optimizer state."""

    def __init__(self):
        self.logits, self.with_state = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        was = model.training
        model.eval()
        with torch.no_grad():
            self.logits[state.global_step] = model(input_ids=PROBE).logits
        model.train(was)
        adapters = [p for m in model.modules() if isinstance(m, LoRALinear) for p in m.adapter_parameters().values()]
        self.with_state[state.global_step] = sum(p in optimizer.state for p in adapters)


@pytest.mark.parametrize("dora", [False, True])
def test_trainer_chain_of_lora(tmp_path, dora):
    model = tiny_model("llama").train()
    fastft.patch(model, fastft.LoRAConfig(r=4, dora=dora, targets=["q_proj", "v_proj", "down_proj"]))
    n_adapter_params = sum(len(m.adapter_parameters()) for m in model.modules() if isinstance(m, LoRALinear))
    before, after = Probe(), Probe()
    lines = []
    callback = FastFTCallback(cola_every=2, log=lines.append)
    trainer = trainer_for(model, tmp_path, [before, callback, after], steps=5, accumulation=1 if dora else 2)
    trainer.train()
    assert callback.events == [(2, "cola"), (4, "cola")]  # not after the last step
    assert sum("Chain of LoRA: merged and restarted" in line for line in lines) == 2
    reports = [line for line in lines if "lora" in line and "->" in line]
    assert len(reports) == 1  # the patch report, once
    for step in range(1, 6):
        if step in (2, 4):  # the merge keeps the function, and the new adapters have no optimizer state
            torch.testing.assert_close(after.logits[step], before.logits[step], **TOLERANCES[torch.float32])
            assert before.with_state[step] == n_adapter_params and after.with_state[step] == 0
        else:
            assert after.with_state[step] == n_adapter_params
    assert (after.logits[5] - after.logits[4]).abs().max() > 1e-3  # the restarted adapters train
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))


def test_callback_refuses_before_the_first_step(tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes; install fastft[test]")
    from helpers import quantize_linears

    model = quantize_linears(tiny_model("llama")).train()
    fastft.patch(model, fastft.LoRAConfig(r=4))
    weights = copy.deepcopy({k: v for k, v in model.state_dict().items()})
    trainer = trainer_for(model, tmp_path, [FastFTCallback(cola_every=2, log=None)])
    with pytest.raises(ValueError, match="4-bit"):
        trainer.train()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="cola_every"):
        FastFTCallback(cola_every=0)
    with pytest.raises(ValueError, match="needs reselect"):
        FastFTCallback(reselect_every=3)


def test_reselection_hook(tmp_path):
    """A partial-backprop policy run by the callback at the start and every 2 steps: the Trainer's optimizer holds
    every candidate, and only the selected adapters move."""
    model = tiny_model("llama").train()
    fastft.patch(model, fastft.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    calls = []
    select_top = reselect_trainable("layers", layers=[-1])

    def reselect(m):
        calls.append(1)
        return select_top(m)

    callback = FastFTCallback(reselect=reselect, reselect_every=2, log=None)
    trainer = trainer_for(model, tmp_path, [callback], steps=4)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    assert callback.events == [(0, "reselect"), (2, "reselect")] and len(calls) == 2
    for name, value in start.items():
        moved = not torch.equal(model.get_parameter(name), value)
        assert moved == (".layers.1." in name and "lora_" in name), name
    fastft.unselect(model)

    # a selection made before the Trainer: its optimizer lacks the other candidates -> a clear error
    other = tiny_model("llama").train()
    fastft.patch(other, fastft.LoRAConfig(r=4, targets=["q_proj"]))
    fastft.select_trainable(other, "layers", layers=[0])
    trainer = trainer_for(other, tmp_path, [FastFTCallback(reselect=reselect_trainable("layers", layers=[1]), log=None)])
    with pytest.raises(ValueError, match="not in the optimizer"):
        trainer.train()


def test_patch_refuses_peft_models_and_points_to_from_peft():
    peft = pytest.importorskip("peft", reason="PEFT models are what is refused; install fastft[test]")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(tiny_model("llama"), copy.deepcopy(config))  # a PeftModel wrapper
    injected = peft.inject_adapter_in_model(copy.deepcopy(config), tiny_model("llama"))  # PEFT layers, no wrapper
    # (transformers' model.add_adapter injects the same PEFT layers; with transformers 5.24 it needs peft >= 0.22)
    for model in (wrapped, injected):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"fastft\.from_peft"):
            fastft.patch(model, fastft.LoRAConfig(r=4))
        assert not fastft.is_patched(model)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
