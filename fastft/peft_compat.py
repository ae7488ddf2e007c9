"""Interchange with PEFT: ``export_peft`` writes a directory ``peft.PeftModel.from_pretrained`` loads;
``from_peft`` patches a plain model from a PEFT LoRA adapter directory.

PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``): weight keys are
``base_model.model.<qualified module name>.lora_A.weight`` (r×in) and ``...lora_B.weight`` (out×r); the
scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). A DoRA adapter (``use_dora``) adds
``...lora_magnitude_vector`` (out), the magnitude m of ``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖``. ``target_modules`` is written as the
list of full qualified names, which PEFT matches exactly, so it patches the same modules fastft did.
Modules fastft trains in full (``LoRAConfig.modules_to_save``, a classification head by default) are PEFT's
``modules_to_save``: saved under their own names (``base_model.model.classifier.weight``), with the task
type (``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``) of the model's class.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file
from torch import nn

from .config import LoRAConfig
from .distributed import full_tensor, is_writer, unwrap
from .io import check_adapter_tensors, read_json, read_safetensors
from .patch import patch, patch_state, unpatch
from .plans.modules_to_save import TrainInFull
from .targets import parameter_targets

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
MAGNITUDE = "lora_magnitude_vector"


# PEFT task types of models whose head fastft trains in full (modules_to_save); PEFT has none for multiple choice
_HEAD_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def _task_type(model: nn.Module, trains_head: bool) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if trains_head:
        return next((task for suffix, task in _HEAD_TASK_TYPES.items() if name.endswith(suffix)), None)
    return None


def _trained_in_full(plan) -> list:
    return [edit for edit in plan.edits if isinstance(edit, TrainInFull)]


# PEFT's load-time rewrite of target_modules for MoE models whose layout changed in transformers v5 (its
# peft.utils.transformers_weight_conversion, mirrored here for when PEFT is not installed): for a model_type that
# transformers' conversion mapping sends to one of these families, every target name ending in one of the leaf
# names becomes an expert-parameter target, so an adapter on a real nn.Linear of that name is dropped on load.
_PEFT_MOE_RENAMED_LEAVES = {
    "mixtral": ("gate", "w1", "w2", "w3"),
    "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
}


def _peft_would_rewrite(model: nn.Module, names: list[str], r: int, alpha: float) -> list[str]:
    """The target names PEFT would not load as the modules they name (its MoE target conversion), in order."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or not names:
        return []
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        LoraConfig = None
    if LoraConfig is not None:
        probe = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(names))
        try:
            convert_peft_config_for_transformers(probe, model=model, conversions=None)
        except ValueError:  # PEFT refuses the combination outright: nothing of it loads as written
            return list(names)
        kept = set(probe.target_modules or ())
        return [n for n in names if n not in kept]
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:
        return []
    leaves = _PEFT_MOE_RENAMED_LEAVES.get(patterns.get(model_type, model_type), ())
    return [n for n in names if n.rsplit(".", 1)[-1] in leaves]


def _peft_renamed_keys(model: nn.Module, tensors: dict, names: list[str], target_parameters: list[str], r: int,
                       alpha: float) -> list[str]:
    """The adapter keys PEFT's load-time weight conversion (transformers' checkpoint renamings applied to adapter
    keys) would rename, so that they no longer name the module fastft trained: laguna's unescaped
    ``mlp.shared_expert.`` pattern turns ``mlp.shared_experts.down_proj`` into ``mlp.shared_experts..down_proj``."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    except ImportError:
        return []
    probe = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(names), target_parameters=target_parameters or None)
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    try:
        converted = convert_peft_adapter_state_dict_for_transformers(model, probe, dict(lora))
    except Exception:  # noqa: BLE001 -- PEFT's loader would raise too: a loud failure, not a silent one
        return []
    return sorted(set(lora) - set(converted))


def _expert_peft_tensors(name: str, module) -> dict[str, torch.Tensor]:
    """PEFT's keys for LoRA on several parameters of one module: one ParamWrapper per parameter, nested in the
    order of ``target_parameters`` (the first one innermost: ``<module>.base_layer.lora_A.weight``)."""
    out = {}
    n = len(module.params)
    for i, param in enumerate(module.params):
        A, B = module.peft_tensors(param)
        stem = f"{PEFT_PREFIX}{name}." + "base_layer." * (n - 1 - i)
        out[f"{stem}lora_A.weight"] = A.contiguous().cpu()
        out[f"{stem}lora_B.weight"] = B.contiguous().cpu()
    return out


def export_peft(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the LoRA (or DoRA) adapters of a patched model as a PEFT adapter directory.

    ``PeftModel.from_pretrained(original_base_model, directory)`` then gives the same logits. A PiSSA
    adapter (whose base holds the residual) is written as the equivalent rank-2r LoRA on the original
    weight, with alpha scaled so the scale is unchanged.

    Under torch.distributed only rank 0 writes; with FSDP2-sharded adapters every rank must call it (the
    adapters are gathered first).
    """
    model = unwrap(model)
    state = patch_state(model)
    if state is None:
        raise ValueError("fastft.export_peft: this model is not patched by fastft.")
    lora_plans = [plan for plan in state.plans if isinstance(plan.config, LoRAConfig)]
    others = [plan.config.method for plan in state.plans if not isinstance(plan.config, LoRAConfig) and plan.swaps]
    if not lora_plans or others:
        raise ValueError(
            f"fastft.export_peft writes LoRA / DoRA adapters only; this model is patched with "
            f"{[c.method for c in state.configs]}, which PEFT cannot represent. Instead: fastft.save(model, directory) "
            "keeps every method (fastft.load reads it back), or fastft.unpatch(model, merge=True) folds the update "
            "into the weights and model.save_pretrained(directory) writes a plain model."
        )
    config: LoRAConfig = lora_plans[0].config
    tensors, names, multiplier = {}, [], 1
    target_parameters = []
    for name, module in lora_plans[0].swaps:
        if hasattr(module, "peft_tensors"):  # fused MoE experts: PEFT's target_parameters (ParamWrapper) layout
            for key, value in _expert_peft_tensors(name, module).items():
                tensors[key] = value
            target_parameters.extend(f"{name}.{p}" for p in module.params)
            continue
        A, B, multiplier = module.peft_factors()
        dtype = module.lora_A.dtype
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
        if config.dora:
            magnitude = full_tensor(module.lora_magnitude_vector.detach())
            tensors[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = magnitude.contiguous().cpu()
        names.append(name)
    saved_in_full = [name for edit in _trained_in_full(lora_plans[0]) for name in edit.names]
    for edit in _trained_in_full(lora_plans[0]):
        for key, value in edit.adapter_tensors().items():  # PEFT's modules_to_save keys: the module's own names
            tensors[f"{PEFT_PREFIX}{key}"] = value.contiguous().cpu()
    r = config.r * multiplier
    alpha = config.alpha * (math.sqrt(multiplier) if config.rslora else multiplier)
    rewritten = _peft_would_rewrite(model, names, r, alpha)
    if rewritten:
        model_type = getattr(model.config, "model_type", "?")
        raise ValueError(
            f"fastft.export_peft: PEFT would load this adapter differently from how fastft trained it. For a "
            f"{model_type!r} model PEFT rewrites, when it loads, target names ending in gate_proj / up_proj / "
            f"down_proj / gate (or w1 / w2 / w3) into fused-expert parameter targets (its transformers v4 -> v5 MoE "
            f"conversion), so the adapters of these nn.Linear modules would be silently dropped: {rewritten[:6]}"
            f"{' ...' if len(rewritten) > 6 else ''} ({len(rewritten)} modules). Leave them out of targets to "
            "export to PEFT, or keep the adapter in fastft's own format (fastft.save / fastft.load)."
        )
    renamed = [] if rewritten else _peft_renamed_keys(model, tensors, names, target_parameters, r, alpha)
    if renamed:
        model_type = getattr(model.config, "model_type", "?")
        raise ValueError(
            f"fastft.export_peft: PEFT would load this adapter differently from how fastft trained it. For a "
            f"{model_type!r} model PEFT renames adapter keys on load with transformers' checkpoint conversion, so "
            f"these keys would no longer name the modules fastft trained and their adapters would be silently "
            f"dropped: {renamed[:4]}{' ...' if len(renamed) > 4 else ''} ({len(renamed)} keys). Leave those modules "
            "out of targets to export to PEFT, or keep the adapter in fastft's own format (fastft.save / fastft.load)."
        )
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model, bool(saved_in_full)),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": names,
        "target_parameters": target_parameters or None,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "bias": "none",
        # GPT-2's Conv1D stores weights in×out; PEFT's flag for that (it also sets it per layer type on load)
        "fan_in_fan_out": any(getattr(module, "fan_in_fan_out", False) for _, module in lora_plans[0].swaps),
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": saved_in_full or None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if not is_writer():
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS))
    with open(os.path.join(directory, PEFT_CONFIG), "w") as f:
        json.dump(peft_config, f, indent=2)


_UNSUPPORTED = {
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "layer_replication": lambda v: bool(v),
    "lora_bias": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
}


def _read_peft_weights(directory: str) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter's tensors and the file they came from. Only safetensors is read: a pickle (``.bin``) can
    run code when it is loaded, so fastft never opens one."""
    path = os.path.join(directory, PEFT_WEIGHTS)
    if os.path.exists(path):
        return read_safetensors(path, "fastft.from_peft"), path
    pickle = os.path.join(directory, PEFT_WEIGHTS_BIN)
    if os.path.exists(pickle):
        raise ValueError(
            f"fastft.from_peft: {directory!r} holds only {PEFT_WEIGHTS_BIN}, a pickle file, which fastft does not open "
            "(unpickling can run arbitrary code). Convert it to safetensors in a trusted environment, with PEFT: "
            "PeftModel.from_pretrained(base_model, directory).save_pretrained(new_directory, "
            f"safe_serialization=True), which writes {PEFT_WEIGHTS}; then load new_directory."
        )
    raise FileNotFoundError(f"fastft.from_peft: no {PEFT_WEIGHTS} in {directory!r}; is it a PEFT adapter directory?")


def _modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Qualified names of the modules PEFT's ``modules_to_save`` entries match (a name ending with an entry),
    outermost only; entries that match nothing are skipped, as PEFT does (its SEQ_CLS lists both
    ``classifier`` and ``score``)."""
    hits = [n for n, _ in model.named_modules() if n and any(n.endswith(entry) for entry in names)]
    return [n for n in hits if not any(o != n and n.startswith(o + ".") for o in hits)]


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _expert_targets(model: nn.Module, target_parameters: list[str], weights: dict[str, torch.Tensor]):
    """Resolve PEFT ``target_parameters`` (fused MoE expert weights) against ``model``; pop their tensors from
    ``weights``. Returns (full parameter names for LoRAConfig.targets, {module: {param: (A, B)}})."""
    targets, found = [], {}
    if not target_parameters:
        return targets, found
    per_module: dict[str, list[str]] = {}
    for entry in target_parameters:
        for name, module in model.named_modules():
            for param, tensor in module.named_parameters(recurse=False):
                full = f"{name}.{param}" if name else param
                if full == entry or full.endswith("." + entry):
                    if param not in parameter_targets(module):
                        raise ValueError(
                            f"fastft.from_peft: target_parameters entry {entry!r} names {full} of "
                            f"{type(module).__name__}, a {tensor.dim()}-D parameter; fastft reads PEFT's "
                            "target_parameters on fused 3-D MoE expert weights and MoE router weights only."
                        )
                    if param not in per_module.setdefault(name, []):
                        per_module[name].append(param)
    if not per_module:
        raise ValueError(f"fastft.from_peft: target_parameters {target_parameters} match no parameter of "
                         f"{type(model).__name__}.")
    for name, params in per_module.items():
        # PEFT nests one ParamWrapper per parameter (``<module>.base_layer.…``); which parameter sits at which depth
        # follows the order PEFT processed them, so each depth's factors are matched to a parameter by shape
        # (A: experts·r × in), falling back to the listed order (the first innermost) where shapes cannot tell
        module = model.get_submodule(name)
        n = len(params)
        stems = [f"{PEFT_PREFIX}{name}." + "base_layer." * (n - 1 - i) for i in range(n)]
        if any(f"{stem}lora_A.weight" not in weights for stem in stems):
            raise ValueError(f"fastft.from_peft: missing LoRA weights for the expert parameters {params} of {name} "
                             f"(expected {[stem + 'lora_A.weight' for stem in stems]}).")

        def fan_in(param):
            w = getattr(module, param)
            return w.shape[1] if getattr(module, "is_transposed", False) else w.shape[2]

        order = list(params)
        by_shape = [[p] for p in params] if n == 1 else [[p for p in params if weights[f"{stem}lora_A.weight"].shape[1] == fan_in(p)] for stem in stems]
        if all(len(c) == 1 for c in by_shape) and len({c[0] for c in by_shape}) == n:
            order = [c[0] for c in by_shape]
        for stem, param in zip(stems, order):
            found.setdefault(name, {})[param] = (weights.pop(f"{stem}lora_A.weight"), weights.pop(f"{stem}lora_B.weight"))
        targets.extend(f"{name}.{param}" for param in params)
    return targets, found


def from_peft(model: nn.Module, directory: str | os.PathLike):
    """Patch a plain ``model`` with fastft LoRA (DoRA for ``use_dora``) from a PEFT adapter directory; returns
    the report."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, PEFT_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"fastft.from_peft: {config_path} is missing; is {directory!r} a PEFT adapter?")
    peft_config = read_json(config_path, "fastft.from_peft")
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"fastft.from_peft reads LoRA adapters; this one is {peft_config.get('peft_type')!r}.")
    bad = [key for key, test in _UNSUPPORTED.items() if key in peft_config and test(peft_config[key])]
    if bad:
        raise ValueError(
            f"fastft.from_peft: this adapter uses PEFT options fastft does not read yet: "
            f"{ {k: peft_config[k] for k in bad} }."
        )
    weights, weights_path = _read_peft_weights(directory)
    dora = bool(peft_config.get("use_dora", False))
    # PEFT saves the DoRA magnitude as ".lora_magnitude_vector" (older versions: "...vector.weight")
    suffixes = {f".{part}.weight": part for part in ("lora_A", "lora_B")}
    if dora:
        suffixes.update({f".{MAGNITUDE}": MAGNITUDE, f".{MAGNITUDE}.weight": MAGNITUDE})
    expert_targets, expert_factors = _expert_targets(model, peft_config.get("target_parameters") or [], weights)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    in_full: dict[str, torch.Tensor] = {}  # weights of modules_to_save: "<module>.<parameter>" -> value
    saved_modules = _modules_to_save(model, peft_config.get("modules_to_save") or [])
    for key, value in weights.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"fastft.from_peft: unexpected weight name {key!r} (expected {PEFT_PREFIX}...).")
        stem = key[len(PEFT_PREFIX):]
        for suffix, part in suffixes.items():
            if stem.endswith(suffix):
                factors.setdefault(stem[: -len(suffix)], {})[part] = value
                break
        else:
            if any(stem.startswith(module + ".") for module in saved_modules):
                in_full[stem] = value
                continue
            what = "a LoRA A/B matrix or DoRA magnitude" if dora else "a LoRA A/B matrix"
            if saved_modules:
                what += f" or a weight of the modules_to_save {saved_modules}"
            raise ValueError(f"fastft.from_peft: weight {key!r} is not {what}.")
    parts = {"lora_A", "lora_B", MAGNITUDE} if dora else {"lora_A", "lora_B"}
    incomplete = [name for name, f in factors.items() if set(f) != parts]
    if incomplete:
        raise ValueError(f"fastft.from_peft: modules without all of {sorted(parts)}: {incomplete[:5]}")
    if not factors and not expert_targets:
        raise ValueError(f"fastft.from_peft: {weights_path} holds no LoRA A/B matrices; it is not a LoRA adapter.")
    absent = [name for name in factors if not _has_module(model, name)]
    if absent:
        raise ValueError(
            f"fastft.from_peft: {weights_path} holds adapters for {len(absent)} module(s) this model does not have: "
            f"{absent[:5]}. The adapter was trained on another base model; load it onto that one."
        )
    try:
        config = LoRAConfig(
            r=peft_config.get("r"),
            alpha=peft_config.get("lora_alpha"),
            dropout=peft_config.get("lora_dropout") or 0.0,
            targets=tuple(factors) + tuple(expert_targets),
            rslora=bool(peft_config.get("use_rslora", False)),
            dora=dora,
            modules_to_save=tuple(m for m in saved_modules if any(k.startswith(m + ".") for k in in_full)),
        )
    except ValueError as err:
        raise ValueError(f"fastft.from_peft: {config_path} holds a value fastft cannot use: {err}") from err
    report = patch(model, config)
    try:
        expected = {}
        for name, module in patch_state(model).modules():
            if name in expert_factors:  # PEFT's target_parameters tensors: checked by load_peft_tensors below
                continue
            for key, value in module.adapter_state_dict().items():
                expected[f"{name}.{key}"] = value
        found = {f"{name}.{part}": value for name, parts in factors.items() for part, value in parts.items()}
        check_adapter_tensors(expected, found, weights_path, "fastft.from_peft",
                              hint="The adapter was trained on another base model, or with other settings.")
        for name, module in patch_state(model).modules():
            if name in expert_factors:
                for param, (A, B) in expert_factors[name].items():
                    module.load_peft_tensors(param, A, B)
                continue
            device = module.lora_A.device
            module.load_adapter_state_dict({k: v.to(device) for k, v in factors[name].items()})
        for plan in patch_state(model).plans:
            for edit in _trained_in_full(plan):
                edit.load_adapter_tensors(in_full)
    except Exception:
        unpatch(model, merge=False)
        raise
    return report
