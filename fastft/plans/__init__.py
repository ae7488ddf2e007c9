"""How each method applies to a whole model: one file per method, each registering its planner.

A planner turns a config into a :class:`fastft.plans.registry.Plan` (module swaps, model-level edits)
without modifying the model; ``fastft.patch`` applies it. The registry is its own small module
(:mod:`fastft.plans.registry`); importing this package registers every method.
"""
from . import loss  # noqa: F401
from . import lora  # noqa: F401
from . import qat  # noqa: F401
from . import s2ft  # noqa: F401
from . import sparse  # noqa: F401
from . import lofit  # noqa: F401
from . import selective_lora  # noqa: F401
from . import dsee  # noqa: F401
from . import qgoft  # noqa: F401
