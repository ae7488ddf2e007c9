"""Drop-in ``nn.Module`` replacements, one method per file."""
from .layer import FastFTLayer
from .lora import LoRALinear
from .dora import DoRALinear
from .quant import QuantLinear
from .s2ft import S2FTLinear
from .experts import LoRAExperts

FASTFT_MODULES = (FastFTLayer,)  # isinstance(module, FASTFT_MODULES): a module fastft.patch put in

__all__ = ["FastFTLayer", "LoRALinear", "FASTFT_MODULES"]
__all__ += ["DoRALinear"]
__all__ += ["QuantLinear"]
__all__ += ["S2FTLinear"]
__all__ += ["LoRAExperts"]
from .experts_dora import DoRAExperts
from .router import LoRARouter

__all__ += ["DoRAExperts", "LoRARouter"]
