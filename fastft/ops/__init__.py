"""fastft ops: one op per file, each a ``torch.library`` custom op whose PyTorch implementation is the spec."""
from .dequantize_4bit import FourBitWeight, dequantize_4bit
from .lora import lora_linear
from .s2ft_linear import s2ft_linear

__all__ = ["FourBitWeight", "dequantize_4bit", "lora_linear"]
__all__ += ["s2ft_linear"]
