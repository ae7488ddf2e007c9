"""Drop-in ``nn.Module`` replacements, one method per file."""
from .layer import FastFTLayer
from .lora import LoRALinear
from .dora import DoRALinear
from .loldu import LoLDULinear
from .qat import QuantLinear
from .s2ft import S2FTLinear
from .experts import LoRAExperts
from .lofit import LoFiTLinear
from .selective_lora import SelectiveLoRALinear, selective_lora_active
from .qgoft import QGOFTLinear

FASTFT_MODULES = (FastFTLayer,)  # isinstance(module, FASTFT_MODULES): a module fastft.patch put in

__all__ = ["FastFTLayer", "LoRALinear", "FASTFT_MODULES"]
__all__ += ["DoRALinear"]
__all__ += ["LoLDULinear"]
__all__ += ["QuantLinear"]
__all__ += ["S2FTLinear"]
__all__ += ["LoRAExperts"]
__all__ += ["LoFiTLinear"]
__all__ += ["SelectiveLoRALinear", "selective_lora_active"]
from .sparse_delta import SparseDeltaLinear
from .dsee import DSEELinear

__all__ += ["SparseDeltaLinear", "DSEELinear"]
from .experts_dora import DoRAExperts
from .router import LoRARouter

__all__ += ["DoRAExperts", "LoRARouter"]
__all__ += ["QGOFTLinear"]
