"""fastft: fast, memory-lean fine-tuning methods for Hugging Face transformers models.

    report = fastft.patch(model, fastft.LoRAConfig(r=16))
    print(report)            # what was patched, and the backend each module runs on
    ...train with any trainer...
    fastft.save(model, "adapter")          # or fastft.export_peft(model, "peft-adapter")
    fastft.unpatch(model, merge=True)      # a plain model again, updates folded in
"""
from ._version import __version__  # noqa: F401
from . import nn, ops
from .config import LoRAConfig
from .config import LossConfig
from .config import S2FTConfig
from .config import SparseConfig
from .config import LoFiTConfig
from .config import SelectiveLoRAConfig
from .config import DSEEConfig
from .config import QGOFTConfig
from .dispatch import backends
from .io import load, save
from . import plans  # noqa: F401  (registers the planners)
from .patch import is_patched, patch, unpatch
from .plans.regularization import regularization_loss
from .peft_compat import export_peft, from_peft
from .policies import SelectionReport, select_trainable, unselect
from .report import PatchReport
from .config import QATConfig
from .qat_export import export_quantized, load_quantized

__all__ = [
    "LoRAConfig",
    "LossConfig",
    "PatchReport",
    "S2FTConfig",
    "SparseConfig",
    "LoFiTConfig",
    "SelectiveLoRAConfig",
    "DSEEConfig",
    "QGOFTConfig",
    "backends",
    "export_peft",
    "from_peft",
    "is_patched",
    "load",
    "nn",
    "ops",
    "patch",
    "save",
    "unpatch",
    "SelectionReport",
    "select_trainable",
    "unselect",
]
__all__ += ["QATConfig", "export_quantized", "load_quantized"]
from .merging import merge, merged_state_dict
__all__ += ["merge", "merged_state_dict"]
from .io import adapter_state_dict
from . import distributed  # noqa: F401  (DDP / FSDP2 helpers; see the README's "Multi-process training")
__all__ += ["adapter_state_dict", "regularization_loss"]
from .sparse_delta_io import apply_sparse_delta, revert_sparse_delta, save_sparse_delta
__all__ += ["apply_sparse_delta", "revert_sparse_delta", "save_sparse_delta"]
