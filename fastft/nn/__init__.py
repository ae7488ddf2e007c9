"""Drop-in ``nn.Module`` replacements, one method per file."""
from .lora import LoRALinear
from .dora import DoRALinear

FASTFT_MODULES = (LoRALinear,)

__all__ = ["LoRALinear", "FASTFT_MODULES"]
__all__ += ["DoRALinear"]
