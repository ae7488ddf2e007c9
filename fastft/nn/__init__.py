"""Drop-in ``nn.Module`` replacements, one method per file."""
from .lora import LoRALinear
from .dora import DoRALinear
from .quant import QuantLinear

FASTFT_MODULES = (LoRALinear,)
FASTFT_MODULES += (QuantLinear,)

__all__ = ["LoRALinear", "FASTFT_MODULES"]
__all__ += ["DoRALinear"]
__all__ += ["QuantLinear"]
