"""Drop-in ``nn.Module`` replacements, one method per file."""
from .layer import FastFTLayer
from .lora import LoRALinear
from .dora import DoRALinear
from .quant import QuantLinear
from .s2ft import S2FTLinear
from .experts import LoRAExperts
from .qgoft import QGOFTLinear

FASTFT_MODULES = (FastFTLayer,)  # isinstance(module, FASTFT_MODULES): a module fastft.patch put in

__all__ = ["FastFTLayer", "LoRALinear", "FASTFT_MODULES"]
__all__ += ["DoRALinear"]
__all__ += ["QuantLinear"]
__all__ += ["S2FTLinear"]
__all__ += ["LoRAExperts"]
__all__ += ["QGOFTLinear"]
