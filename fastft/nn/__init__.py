"""Drop-in ``nn.Module`` replacements, one method per file."""
from .lora import LoRALinear
from .dora import DoRALinear
from .quant import QuantLinear
from .s2ft import S2FTLinear
from .experts import LoRAExperts

FASTFT_MODULES = (LoRALinear,)
FASTFT_MODULES += (QuantLinear,)
FASTFT_MODULES += (S2FTLinear,)
FASTFT_MODULES += (LoRAExperts,)

__all__ = ["LoRALinear", "FASTFT_MODULES"]
__all__ += ["DoRALinear"]
__all__ += ["QuantLinear"]
__all__ += ["S2FTLinear"]
__all__ += ["LoRAExperts"]
