"""Model merging: combine models fine-tuned from one base, given as state dicts or as fastft adapters.

    merged = fastft.merge(base_model, [run_a, run_b], method="model_stock")   # -> a state dict
    base_model.load_state_dict(merged)

Each entry of ``models`` (and ``base``) may be a state dict, a ``fastft.patch``-ed model (its adapters
merged in: :func:`merged_state_dict`; LoRA, DoRA and sparse deltas), a plain model, a saved adapter
directory (``fastft.save`` or a PEFT LoRA/DoRA directory, applied to ``base``, which must then be the plain
model), or a sparse-delta file (``fastft.save_sparse_delta``: its ΔW added to ``base``, a model or a state
dict). Sparse deltas compose by addition: ``merge(base, [lang, task], method="task_arithmetic")`` is
``base + Δlang + Δtask``. Every state dict must
have the base's names, shapes and dtypes; the first mismatch is named in a ``ValueError``.

With w₀ the base, w₁..w_N the fine-tuned models and τᵢ = wᵢ − w₀ their task vectors, each floating-point
tensor is merged on its own (the unit Model Stock calls a layer: a weight and its bias are two units):

``"soup"``  (uniform model soup, Wortsman et al. 2022)
    w = (1/N) Σ wᵢ. The base is optional (used only to check the models against).
``"task_arithmetic"``  (Ilharco et al. 2023), ``scale=λ`` (a number, or one per model; default 1)
    w = w₀ + Σ λᵢ τᵢ.
``"model_stock"``  (Jang et al. 2024), N ≥ 2
    w = w₀ + t · (1/N) Σ τᵢ  (= t·w̄ + (1 − t)·w₀, w̄ the average of the fine-tuned models),
    t = N cos θ / (1 + (N − 1) cos θ), with cos θ the cosine between τ₁ and τ₂ (for N > 2 the mean over all
    pairs, as mergekit does; the paper assumes the pairwise angles equal). θ = 0 gives t = 1 (the average),
    orthogonal updates t = 0 (the base). A negative cosine is taken as 0 (t would leave [0, 1]: at cos θ = −1
    and N = 2 it divides by zero), and so is the cosine with an all-zero update: such a tensor stays at w₀.
``"lines"``  (LiNeS, Wang et al. 2025), ``alpha=α``, ``beta=β`` (required)
    w = w₀ + λ(ℓ) Σ τᵢ, λ(ℓ) = α + β (ℓ − 1)/(L − 1) for a tensor of layer ℓ = 1..L of the decoder (or
    encoder) stack: shallow layers stay close to the base. Tensors outside the stack (embeddings, final norm,
    heads) are scaled by α, as in the paper's code (override with ``outside=``). The paper's settings: one
    model, α = λ and β = 1 − λ; N task vectors summed, α = 1/N and β tuned. To apply LiNeS to another merge,
    pass that merge as the single model. The stack is the base model's (``fastft.targets.find_layer_stack``)
    when ``base`` is a model; for state dicts it is inferred from the names (the ``<prefix>.<i>.`` holding
    the most tensors) or given as ``layer_prefix=`` (and ``num_layers=``).

Tensors that are not floating point (integer buffers) must be equal in every model and are copied from the
base. Arithmetic runs in float32 (float64 for float64 tensors) on the base tensor's device; each result
takes the dtype of its inputs.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .config import LoRAConfig, check_number
from .io import CONFIG_NAME, load
from .nn.lora import LoRALinear
from .patch import is_patched, patch_state, unpatch
from .peft_compat import PEFT_CONFIG, from_peft
from .nn.sparse_delta import SparseDeltaLinear
from .plans.modules_to_save import TrainInFull
from .plans.regularization import RegularizationEdit
from .plans.sparse import ScheduleEdit
from .sparse_delta_io import sparse_delta_state_dict
from .targets import find_layer_stack

StateDict = dict[str, Tensor]
Source = Union[Mapping[str, Tensor], nn.Module, str, os.PathLike]

METHODS = ("soup", "task_arithmetic", "model_stock", "lines")
_PARAMS = {
    "soup": {},
    "task_arithmetic": {"scale": 1.0},
    "model_stock": {},
    "lines": {"alpha": None, "beta": None, "outside": None, "layer_prefix": None, "num_layers": None},
}


# ---------------------------------------------------------------- state dicts from models and adapter dirs
def merged_state_dict(model: nn.Module, adapter: str | os.PathLike | None = None) -> StateDict:
    """The full state dict of ``model`` with its fastft adapters merged in, without changing the model.

    - a model patched with LoRA / DoRA / sparse deltas: what ``fastft.unpatch(model, merge=True).state_dict()`` would give
      (the same values, bit for bit), plain module names (``...q_proj.weight``, no ``base_layer``/``lora_*``);
      modules trained in full (``modules_to_save``) with their trained values;
    - a plain model and an ``adapter`` directory (``fastft.save`` or PEFT): the adapter is loaded onto the
      model, the merged state dict taken, and the model unpatched again (its weights are not written);
    - a plain model alone: its state dict.

    Tensors the adapters do not change share storage with the model's, as ``state_dict()`` does.
    """
    if adapter is not None:
        return _adapter_state_dict(model, os.fspath(adapter))
    state = patch_state(model)
    if state is None:
        return dict(model.state_dict())
    for plan in state.plans:
        if plan.config.method == "loss":  # a fused loss changes the forward only, never a weight
            continue
        sparse = bool(plan.swaps) and all(isinstance(m, SparseDeltaLinear) for _, m in plan.swaps)
        # edits that change no weight (a loss term, a training schedule) or whose weights are read (TrainInFull)
        known = (TrainInFull, RegularizationEdit, ScheduleEdit)
        if not (isinstance(plan.config, LoRAConfig) or sparse) or any(not isinstance(e, known) for e in plan.edits):
            raise ValueError(
                f"fastft.merged_state_dict reads LoRA / DoRA / sparse-delta patches; this model is also patched with "
                f"{plan.config.method!r}. Call fastft.unpatch(model, merge=True) and pass model.state_dict()."
            )
    patched = dict(state.modules())
    for name, module in patched.items():
        if not isinstance(module, (LoRALinear, SparseDeltaLinear)) or type(module.base_layer) is not nn.Linear:
            what = "a 4-bit base" if getattr(module, "is_4bit", False) else type(module.base_layer).__name__
            raise ValueError(
                f"fastft.merged_state_dict: {name} adapts {what}; merging needs plain nn.Linear bases "
                "(merge on the unquantized model)."
            )
    trained = {key for plan in state.plans for edit in plan.edits if isinstance(edit, TrainInFull) for key in edit.params}
    owned = {f"{name}.{key}": name for name, module in patched.items() for key in module.state_dict()}
    # a base weight tied to another entry (lm_head and the embeddings) is merged in both, as unpatch does
    merged = {name: _merged_weight(module) for name, module in patched.items()}
    tied = {module.base_layer.weight.data_ptr(): merged[name] for name, module in patched.items()}
    out: StateDict = {}
    for key, value in model.state_dict().items():
        name = owned.get(key)
        if name is None:
            if key in trained:
                value = value.clone()
            elif value.data_ptr() in tied and tied[value.data_ptr()].shape == value.shape:
                value = tied[value.data_ptr()]
            out[key] = value
        elif f"{name}.weight" not in out:
            out[f"{name}.weight"] = merged[name]
            for sub, tensor in patched[name].base_layer.state_dict().items():
                if sub != "weight":
                    out[f"{name}.{sub}"] = tensor
    return out


def _merged_weight(module) -> Tensor:
    """The weight ``unpatched(merge=True)`` writes, computed without writing it."""
    weight = module.base_layer.weight.detach()
    with torch.no_grad():
        if hasattr(module, "merged_weight"):  # DoRA: g ⊙ (W + s·BA)
            return module.merged_weight().to(weight.dtype)
        delta = module.delta_weight()
        return (weight.to(delta.dtype) + delta.to(weight.device)).to(weight.dtype)


def _adapter_state_dict(model: nn.Module, directory: str) -> StateDict:
    if patch_state(model) is not None:
        raise ValueError(
            "fastft.merged_state_dict(model, adapter): the model is already patched; pass the plain base model "
            "the adapter was trained on."
        )
    if os.path.exists(os.path.join(directory, CONFIG_NAME)):
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            configs = json.load(f).get("configs", [])
        if any(c.get("init") in ("pissa", "corda", "loldu") for c in configs):
            raise ValueError(
                f"fastft.merged_state_dict: {directory!r} is a PiSSA / CorDA / LoLDU adapter, whose loading rewrites the base "
                "weights; load it yourself (fastft.load(model, dir)) and call fastft.merged_state_dict(model)."
            )
        load(model, directory)
    elif os.path.exists(os.path.join(directory, PEFT_CONFIG)):
        from_peft(model, directory)
    else:
        raise FileNotFoundError(
            f"fastft.merged_state_dict: {directory!r} holds neither {CONFIG_NAME} (fastft.save) nor {PEFT_CONFIG} (PEFT)."
        )
    try:
        return merged_state_dict(model)
    finally:
        unpatch(model, merge=False)


def _as_state(source: Any, base_model: nn.Module | None, what: str, base_state: StateDict | None = None) -> StateDict:
    if isinstance(source, nn.Module):
        return merged_state_dict(source)
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):  # a sparse-delta file
        if base_state is None:
            raise ValueError(
                f"fastft.merge: {what} is a sparse-delta file ({os.fspath(source)!r}); pass the base model (or its "
                "state dict) as base so the delta can be added to it."
            )
        return sparse_delta_state_dict(base_state, source, model=base_model)
    if isinstance(source, (str, os.PathLike)):
        if base_model is None:
            raise ValueError(
                f"fastft.merge: {what} is an adapter directory ({os.fspath(source)!r}); pass the plain base model "
                "as base so it can be applied."
            )
        return merged_state_dict(base_model, source)
    if isinstance(source, Mapping):
        bad = next((k for k, v in source.items() if not isinstance(v, Tensor)), None)
        if bad is not None:
            raise TypeError(f"fastft.merge: {what}[{bad!r}] is a {type(source[bad]).__name__}, not a tensor.")
        return dict(source)
    raise TypeError(
        f"fastft.merge: {what} is a {type(source).__name__}; give a state dict, a model, or an adapter directory."
    )


# -------------------------------------------------------------------------------------------- checks
def check_compatible(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str, against: str) -> None:
    """Raise ``ValueError`` naming the first difference in names, shapes or dtypes."""
    for key in reference:
        if key not in other:
            missing = sum(1 for k in reference if k not in other)
            raise ValueError(f"fastft.merge: {what} has no {key!r}, which {against} has ({missing} names missing in all).")
    for key in other:
        if key not in reference:
            extra = sum(1 for k in other if k not in reference)
            raise ValueError(f"fastft.merge: {what} has {key!r}, which {against} has not ({extra} extra names in all).")
    for key, ref in reference.items():
        value = other[key]
        if value.shape != ref.shape:
            raise ValueError(
                f"fastft.merge: {what}[{key!r}] has shape {tuple(value.shape)}, {against} {tuple(ref.shape)}."
            )
        if value.dtype != ref.dtype:
            raise ValueError(f"fastft.merge: {what}[{key!r}] is {value.dtype}, {against} {ref.dtype}.")


# ------------------------------------------------------------------------------------------ formulas
def model_stock_ratio(cos_theta: float, n: int) -> float:
    """Model Stock's t = N cos θ / (1 + (N − 1) cos θ), with cos θ taken in [0, 1] (so t is in [0, 1])."""
    c = min(max(float(cos_theta), 0.0), 1.0)
    return n * c / (1.0 + (n - 1) * c)


def _mean_pairwise_cosine(deltas: list[Tensor]) -> float:
    flat = [d.reshape(-1) for d in deltas]
    norms = [torch.linalg.vector_norm(d) for d in flat]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            if norms[i] == 0 or norms[j] == 0:
                cosines.append(0.0)
            else:
                cosines.append(float(torch.dot(flat[i], flat[j]) / (norms[i] * norms[j])))
    return sum(cosines) / len(cosines)


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float, outside: float | None = None) -> float:
    """LiNeS' λ for a tensor of 0-based ``layer`` (ℓ = layer + 1) of ``num_layers``; ``None``: outside the stack."""
    if layer is None:
        return alpha if outside is None else outside
    return alpha + beta * layer / (num_layers - 1)


def infer_layer_stack(keys: Sequence[str]) -> tuple[str, int] | None:
    """(prefix, number of layers) of the ``<prefix>.<i>.`` holding the most tensors, or None."""
    found: Counter = Counter()
    top: dict[str, int] = {}
    for key in keys:
        match = re.match(r"^(.*?)\.(\d+)\.", key)
        if match:
            prefix, index = match.group(1), int(match.group(2))
            found[prefix] += 1
            top[prefix] = max(top.get(prefix, -1), index)
    if not found:
        return None
    prefix = found.most_common(1)[0][0]
    return prefix, top[prefix] + 1


def _layer_of(key: str, prefix: str) -> int | None:
    head = prefix + "." if prefix else ""
    if not key.startswith(head):
        return None
    first = key[len(head):].split(".", 1)[0]
    return int(first) if first.isdigit() else None


# ------------------------------------------------------------------------------------------------ merge
def merge(
    base: Source | None,
    models: Sequence[Source],
    method: str = "soup",
    **params: Any,
) -> StateDict:
    """Merge ``models`` (fine-tuned from ``base``) with ``method``; returns a new state dict.

    Args:
        base: the pretrained model all ``models`` were fine-tuned from: a state dict or a plain model
            (required by every method but ``"soup"``; needed as a model when ``models`` holds adapter dirs).
        models: the fine-tuned models: state dicts, (patched) models, or adapter directories.
        method: ``"soup"``, ``"task_arithmetic"``, ``"model_stock"`` or ``"lines"`` (see the module docstring).
        **params: ``scale`` (task_arithmetic); ``alpha``, ``beta``, ``outside``, ``layer_prefix``,
            ``num_layers`` (lines).
    """
    if method not in METHODS:
        raise ValueError(f"fastft.merge: method={method!r}; choose one of {list(METHODS)}.")
    unknown = sorted(set(params) - set(_PARAMS[method]))
    if unknown:
        accepted = list(_PARAMS[method]) or "no parameters"
        raise ValueError(f"fastft.merge(method={method!r}) does not take {unknown}; it takes {accepted}.")
    options = {**_PARAMS[method], **params}
    if isinstance(models, (Mapping, nn.Module, str, os.PathLike)) or not isinstance(models, Sequence) or not models:
        raise ValueError("fastft.merge: models must be a non-empty list of state dicts, models or adapter directories.")
    if base is None and method != "soup":
        raise ValueError(f"fastft.merge(method={method!r}) needs the base model (base=...): it merges the updates w_i - base.")
    n = len(models)
    if method == "model_stock" and n < 2:
        raise ValueError("fastft.merge(method='model_stock') needs at least two fine-tuned models (the angle between their updates).")

    base_model = base if isinstance(base, nn.Module) else None
    if base_model is not None:
        if is_patched(base_model):
            raise ValueError("fastft.merge: base is a fastft-patched model; pass the plain pretrained model as base.")
    base_state = None if base is None else _as_state(base, base_model, "base")
    states = [_as_state(m, base_model, f"models[{i}]", base_state) for i, m in enumerate(models)]
    reference = base_state if base_state is not None else states[0]
    against = "the base" if base_state is not None else "models[0]"
    for i, state in enumerate(states):
        if state is not reference:
            check_compatible(reference, state, f"models[{i}]", against)

    combine = _combiner(method, options, n, reference, base_model)
    out: StateDict = {}
    for key, ref in reference.items():
        values = [state[key].to(ref.device) for state in states]
        if not ref.is_floating_point():
            for i, value in enumerate(values):
                if not torch.equal(value, ref):
                    raise ValueError(
                        f"fastft.merge: the non-float tensor {key!r} ({ref.dtype}) differs between models[{i}] and "
                        f"{against}; only floating-point tensors are merged. Make it equal or drop it."
                    )
            out[key] = ref.clone()
            continue
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        ws = [v.to(dtype) for v in values]
        w0 = None if base_state is None else ref.to(dtype)
        with torch.no_grad():
            merged = combine(key, w0, ws)
            if not bool(torch.isfinite(merged).all()) and all(bool(torch.isfinite(v).all()) for v in values):
                raise ValueError(
                    f"fastft.merge(method={method!r}): merging {key!r} gave NaN or inf from finite inputs; check the "
                    f"method's parameters {params} (they must be finite and moderate)."
                )
            out[key] = merged.to(ref.dtype)
    return out


def _combiner(method: str, options: dict, n: int, reference: Mapping[str, Tensor], base_model: nn.Module | None) -> Callable:
    if method == "soup":
        return lambda key, w0, ws: torch.stack(ws).mean(0)

    if method == "task_arithmetic":
        scale = options["scale"]
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * n
        if len(scales) != n:
            raise ValueError(f"fastft.merge: scale={scale!r}; give a number or one number per model ({n}).")
        for i, s in enumerate(scales):
            check_number(f"fastft.merge(method='task_arithmetic'): scale[{i}]" if isinstance(scale, (list, tuple))
                         else "fastft.merge(method='task_arithmetic'): scale", s, hint="Give finite numbers (default 1).")
        return lambda key, w0, ws: w0 + sum(s * (w - w0) for s, w in zip(scales, ws))

    if method == "model_stock":
        def stock(key, w0, ws):
            deltas = [w - w0 for w in ws]
            t = model_stock_ratio(_mean_pairwise_cosine(deltas), n)
            return w0 + t * torch.stack(deltas).mean(0)
        return stock

    alpha, beta, outside = options["alpha"], options["beta"], options["outside"]
    for name, value in (("alpha", alpha), ("beta", beta), ("outside", outside)):
        hint = ("fastft.merge(method='lines') needs numbers alpha and beta, finite (and optionally outside). "
                "The paper: one model, alpha=λ and beta=1-λ; N models summed, alpha=1/N and beta tuned.")
        if value is None and name != "outside":
            raise ValueError(f"{hint} Got {name}=None.")
        if value is not None:
            check_number(f"fastft.merge(method='lines'): {name}", value, hint=hint)
    prefix, num_layers = options["layer_prefix"], options["num_layers"]
    if prefix is None:
        stack = find_layer_stack(base_model) if base_model is not None else None
        if stack is not None:
            prefix, found = stack.prefix, len(stack.blocks)
        else:
            inferred = infer_layer_stack(list(reference))
            if inferred is None:
                raise ValueError(
                    "fastft.merge(method='lines'): no '<prefix>.<i>.' layer stack in the names; pass layer_prefix= "
                    "(e.g. 'model.layers')."
                )
            prefix, found = inferred
    else:
        indices = [_layer_of(k, prefix) for k in reference]
        indices = [i for i in indices if i is not None]
        if not indices:
            raise ValueError(f"fastft.merge(method='lines'): no tensor is named {prefix!r}.<i>.…")
        found = max(indices) + 1
    num_layers = found if num_layers is None else num_layers
    if not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(
            f"fastft.merge(method='lines'): the stack {prefix!r} has {num_layers} layer(s); LiNeS scales across at "
            "least two (pass num_layers= if the state dicts hold only part of the stack)."
        )
    deepest = max((i for i in (_layer_of(k, prefix) for k in reference) if i is not None), default=0)
    if deepest >= num_layers:
        raise ValueError(f"fastft.merge(method='lines'): num_layers={num_layers} but {prefix!r} has layer {deepest}.")

    def lines(key, w0, ws):
        scale = lines_scale(_layer_of(key, prefix), num_layers, alpha, beta, outside)
        return w0 + scale * sum(w - w0 for w in ws)
    return lines
