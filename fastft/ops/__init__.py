"""fastft ops: one op per file, each a ``torch.library`` custom op whose PyTorch implementation is the spec."""
from .dequantize_4bit import FourBitWeight, dequantize_4bit
from .lora import lora_linear
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["FourBitWeight", "dequantize_4bit", "lora_linear"]
__all__ += ["linear_cross_entropy"]
