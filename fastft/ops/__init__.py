"""fastft ops: one op per file, each a ``torch.library`` custom op whose PyTorch implementation is the spec."""
from .dequantize_4bit import FourBitWeight, dequantize_4bit
from .lora import lora_linear
from .dora import dora_linear, dora_row_norm

__all__ = ["FourBitWeight", "dequantize_4bit", "lora_linear"]
__all__ += ["dora_linear", "dora_row_norm"]
