"""CorDA's calibration step: the input covariance of each targeted linear layer on a few batches.

Forward hooks on the (still unpatched) target layers, one no-grad forward per calibration batch in eval mode,
hooks removed and the training flag restored afterwards: the model's weights are not touched. Each row of a
batch is one sample: its activations (tokens×in, float32) are divided by ``|max|`` and ``X̂ᵀ X̂`` is averaged
over the samples, as PEFT's CorDA preprocessing does (:func:`fastft.math.lora_inits.corda_sample_covariance`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..math.lora_inits import corda_sample_covariance


def _run(model: nn.Module, batch: Any) -> None:
    if callable(batch):
        batch(model)
    elif isinstance(batch, dict):
        model(**batch)
    else:
        ids = batch if batch.dim() == 2 else batch.unsqueeze(0)
        model(input_ids=ids)


def input_covariances(model: nn.Module, layers: dict[str, nn.Module], calib: Any) -> dict[str, Tensor]:
    """``{name: C}`` (in×in, float32) for each layer of ``layers`` from the batches of ``calib``."""
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name):
        def hook(module, args, output):
            x = args[0]
            samples = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.unsqueeze(0)
            for sample in samples:
                product = corda_sample_covariance(sample)
                sums[name] = product if name not in sums else sums[name] + product
                counts[name] += 1
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in (calib if isinstance(calib, (list, tuple)) else [calib]):
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise ValueError(f"LoRAConfig(init='corda'): the calibration run never reached {missing[:5]} "
                         f"({len(missing)} target layers); calib must run the model through every target.")
    return {name: sums[name] / counts[name] for name in layers}
