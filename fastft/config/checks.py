"""Value checks every config shares, the base class and the registry of config classes.

A bad value raises ``ValueError`` at construction, naming the field and what to use instead, so a
mistake never reaches the model. Each config serialises to a JSON-able dict (``to_dict``) tagged with
its method name and back (``config_from_dict``), which is what ``fastft.save`` writes.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence, Union

Targets = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


# ------------------------------------------------------------------------------------ value checks
class WrongType(TypeError, ValueError):
    """A value of the wrong type (a str for a number, 1 for a bool). Both a ``TypeError`` and, as every bad
    config value is, a ``ValueError``."""


def check_bool(what: str, value: Any) -> bool:
    """``value`` if it is a bool; a ``TypeError`` naming ``what`` otherwise (no truthy stand-ins: 'no', 1)."""
    if not isinstance(value, bool):
        raise WrongType(f"{what}={value!r}: must be True or False (a bool, not {type(value).__name__}).")
    return value


def check_number(
    what: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> float | int:
    """``value`` if it is a finite real number (an int when ``integer``) inside the given bounds.

    A bool, a string or a tensor is a ``TypeError``; NaN, ±inf or a value out of range a ``ValueError``.
    Every message names ``what``, the value and the accepted range, plus ``hint``.
    """
    kinds = "an integer" if integer else "a number"
    bounds = ""
    if low is not None or high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        bounds = f" in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    tail = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise WrongType(f"{what}={value!r}: must be {kinds}{bounds}, not a {type(value).__name__}.{tail}")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{what}={value!r}: must be a finite number{bounds}.{tail}")
    bad = (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        raise ValueError(f"{what}={value!r}: must be {kinds}{bounds}.{tail}")
    return int(value) if integer else value


# PEFT's names for fastft's config fields: a PEFT habit gets told the fastft name instead of a bare TypeError
PEFT_NAMES = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "init_lora_weights": "init",
    "layers_to_transform": "layers",
}


def with_known_names(cls: type) -> type:
    """Wrap a dataclass ``__init__`` so an unknown keyword names the fields (and PEFT's spelling of them)."""
    init = cls.__init__
    fields = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            renames = [f"{k}= is {PEFT_NAMES[k]}=" for k in unknown if PEFT_NAMES.get(k) in fields]
            hint = f" (PEFT's names: {'; '.join(renames)} in fastft)" if renames else ""
            raise TypeError(f"{cls.__name__} has no argument(s) {unknown}{hint}; its arguments are {fields}.")
        if len(args) > len(fields):
            raise TypeError(f"{cls.__name__} takes at most {len(fields)} arguments ({fields}), got {len(args)}.")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return cls


def check_targets(targets: Any) -> Targets:
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(
                    f"targets={targets!r} is neither 'all-linear' nor a valid regular expression ({err}). "
                    "Pass a list of module-name suffixes such as ['q_proj', 'v_proj'] to match by name."
                ) from None
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return tuple(targets)
    raise ValueError(
        f"targets={targets!r}: use 'all-linear', a non-empty list of module-name suffixes "
        "(e.g. ['q_proj', 'down_proj']), or a regular expression over qualified module names."
    )


def check_layers(layers: Any) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if isinstance(layers, range):
        layers = tuple(layers)
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise ValueError(f"layers={layers!r}: use None (all decoder layers) or a non-empty list of layer indices >= 0.")
    return tuple(sorted(set(layers)))




@dataclass
class MethodConfig:
    """Base of every method config: a method name and a JSON round trip."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"method": self.method, **data}


CONFIG_CLASSES: dict[str, type[MethodConfig]] = {}


def register_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make ``cls`` known to :func:`config_from_dict` under ``cls.method``."""
    if not cls.method or cls.method in CONFIG_CLASSES:
        raise ValueError(f"{cls.__name__}.method={cls.method!r} is empty or already registered")
    CONFIG_CLASSES[cls.method] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild a config from :meth:`MethodConfig.to_dict` output."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ValueError(f"unknown fastft method {method!r} in saved config; known: {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    if "method" in fields:  # one class for several methods (SparseConfig): the method is a field
        data["method"] = method
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"saved {cls.__name__} has fields this fastft does not know: {unknown}")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)
