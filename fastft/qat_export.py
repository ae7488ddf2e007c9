"""``fastft.export_quantized`` / ``fastft.load_quantized``: a QAT model as integer codes plus its rotations.

A directory written by :func:`export_quantized` holds

``quantized.safetensors``
    for every fake-quantized linear layer ``<name>`` (names of the plain model): ``<name>.codes`` (the
    integer codes of ``fastft.ops.fake_quantize.quantize``: one per weight, unpacked), ``<name>.scale`` and
    ``<name>.zero`` (per output channel, or per group of ``group_size`` inputs); under LoRA the codes are
    those of the merged weight ``W + s·BA``, the weight QAT trained through. Every other tensor of the
    model (embeddings, norms, biases, ``lm_head``) as it is in the rotated model, under its plain name.
    ``rotation.r1.signs``: R1's random signs (``Q₁ = diag(signs) · Hᵀ``), for reference: R1 and R2 are
    already folded into the tensors.
``quantized_config.json``
    the resolved :class:`~fastft.QATConfig` (per-layer R3 / R4), the quantization format of each layer, the
    rotation layout (what is folded, what a runtime must apply online: R3 on queries and keys after RoPE,
    R4 on ``down_proj``'s input, both ``x ↦ hadamard_transform(x)``), dtype and attention implementation.

:func:`load_quantized` builds the model from its transformers config, patches it with the saved QAT
config, and loads the tensors; each ``QuantLinear`` then holds the dequantized codes (``weight_on_grid``)
and is not re-quantized, so its outputs equal those of the exported model.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._version import __version__
from .config import QATConfig, config_from_dict
from .patch import patch, patch_state

WEIGHTS_NAME = "quantized.safetensors"
CONFIG_NAME = "quantized_config.json"
FORMAT = "fastft-quantized/1"


def _plain_name(name: str) -> str:
    return name.replace(".base_layer", "")


def _qat_plan(model: nn.Module, what: str):
    state = patch_state(model)
    plans = [plan for plan in state.plans if isinstance(plan.config, QATConfig)] if state else []
    if not plans:
        raise ValueError(f"fastft.{what}: this model is not patched with a fastft.QATConfig.")
    return state, plans[0]


def export_quantized(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the integer codes, scales and zero points of every QAT layer, the other tensors and the
    rotation configuration of a QAT-patched model to ``directory`` (LoRA updates merged first)."""
    state, plan = _qat_plan(model, "export_quantized")
    config: QATConfig = plan.config
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    skip: set[int] = set()
    for other in state.plans:
        if other is not plan:
            skip.update(id(p) for p in other.adapter_parameters())
    with torch.no_grad():
        for name, module in plan.swaps:
            outer = model.get_submodule(name)
            update = () if outer is module else (outer.lora_A, outer.lora_B, outer.scale)
            codes, scale, zero = module.codes(*update)
            tensors[f"{name}.codes"] = codes.contiguous().cpu()
            tensors[f"{name}.scale"] = scale.contiguous().cpu()
            tensors[f"{name}.zero"] = zero.contiguous().cpu()
            skip.add(id(module.weight))
            spec = module.weight_quant
            layers[name] = {
                "shape": [module.out_features, module.in_features], "bits": spec.bits, "granularity": spec.granularity,
                "group_size": spec.group_size, "symmetric": spec.symmetric, "clip_ratio": spec.clip_ratio,
                "input_bits": module.input_quant.bits if module.input_quant else None,
                "input_granularity": module.input_quant.granularity if module.input_quant else None,
                "input_rotation": "hadamard" if module.rotate_input else None,
            }
        seen: set[int] = set()
        for key, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in skip or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            tensors[_plain_name(key)] = tensor.detach().contiguous().cpu()
    rotations = config.rotations
    folding = [e for e in plan.edits if type(e).__name__ == "RotationFolding"]
    layout = folding[0].layout if folding else None
    if rotations["r1"]:
        tensors["rotation.r1.signs"] = folding[0].q1.signs.to(torch.int8)
    meta = {
        "format": FORMAT,
        "fastft_version": __version__,
        "model_type": getattr(model.config, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": _original_attention(model, plan),
        "qat_config": config.to_dict(),
        "rotations": {
            "matrix": "Q = diag(signs) @ H.T acting on row vectors (x -> x Q = hadamard_transform(x * signs)); "
                      "H = fastft.ops.hadamard.hadamard_matrix(size)",
            "r1": {"folded": True, "size": layout.hidden_size, "seed": config.seed} if rotations["r1"] else None,
            "r2": {"folded": True, "size": layout.head_dim} if rotations["r2"] else None,
            "r3": {"online": "queries and keys after RoPE", "layers": list(rotations["r3"])},
            "r4": {"online": "down_proj input; inverse folded into down_proj", "layers": list(rotations["r4"])},
        },
        "layers": layers,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def _original_attention(model: nn.Module, plan) -> str | None:
    for edit in plan.edits:
        if type(edit).__name__ == "AttentionEdit":
            return edit.implementation
    return getattr(model.config, "_attn_implementation", None)


def load_quantized(model_config, directory: str | os.PathLike) -> nn.Module:
    """Rebuild the fake-quant model :func:`export_quantized` wrote, from its transformers config.

    Returns a QAT-patched model (in eval mode) whose outputs equal the exported model's. Its layers hold
    the dequantized codes and do not train; ``fastft.unpatch(model, merge=True)`` gives the plain float
    model (dequantized weights) in the original basis.
    """
    from transformers import AutoModelForCausalLM

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"fastft.load_quantized: {path} is missing; is {directory!r} a fastft.export_quantized directory?")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"fastft.load_quantized: {directory!r} holds format {meta.get('format')!r}, expected {FORMAT!r}.")
    if getattr(model_config, "model_type", None) != meta["model_type"]:
        raise ValueError(
            f"fastft.load_quantized: the export is of a {meta['model_type']!r} model, the config given is "
            f"{getattr(model_config, 'model_type', None)!r}."
        )
    config = config_from_dict(meta["qat_config"])
    kwargs = {"attn_implementation": meta["attn_implementation"]} if meta.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_config(model_config, **kwargs).to(getattr(torch, meta["dtype"])).eval()
    patch(model, config)
    _, plan = _qat_plan(model, "load_quantized")
    tensors = load_file(weights_path)
    modules = dict(plan.swaps)
    if sorted(modules) != sorted(meta["layers"]):
        raise ValueError("fastft.load_quantized: the model built from this config has other linear layers than the export.")
    device = next(model.parameters()).device
    plain = {_plain_name(k): t for k, t in model.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        for name, module in modules.items():
            module.load_codes(*(tensors.pop(f"{name}.{part}").to(device) for part in ("codes", "scale", "zero")))
        tensors.pop("rotation.r1.signs", None)
        missing = sorted(set(tensors) - set(plain))
        if missing:
            raise ValueError(f"fastft.load_quantized: the export has tensors this model lacks: {missing[:5]}")
        for key, value in tensors.items():
            target = plain[key]
            if target.shape != value.shape:
                raise ValueError(f"fastft.load_quantized: {key} has shape {tuple(value.shape)} in the export, {tuple(target.shape)} here.")
            target.copy_(value.to(target.device, target.dtype))
    return model
