"""How each method applies to a whole model: one file per method, each registering its planner.

A planner turns a config into a :class:`fastft.patch.Plan` (module swaps, model-level edits) without
modifying the model; ``fastft.patch`` applies it.
"""
from . import loss  # noqa: F401
from . import lora  # noqa: F401
from . import qat  # noqa: F401
from . import s2ft  # noqa: F401
