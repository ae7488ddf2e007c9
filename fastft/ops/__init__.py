"""fastft ops: one op per file, each a ``torch.library`` custom op whose PyTorch implementation is the spec."""
from .dequantize_4bit import FourBitWeight, dequantize_4bit
from .lora import lora_linear
from .dora_row_norm import dora_row_norm
from .dora import dora_linear
from .hadamard import hadamard_matrix, hadamard_transform, is_hadamard_size
from .fake_quantize import dequantize, fake_quantize, quantize
from .linear_cross_entropy import linear_cross_entropy
from .s2ft_linear import s2ft_linear
from .qat_linear import quant_weight_linear
from .givens_rotation import givens_rotation

__all__ = ["FourBitWeight", "dequantize_4bit", "lora_linear"]
__all__ += ["dora_linear", "dora_row_norm"]
__all__ += ["hadamard_matrix", "hadamard_transform", "is_hadamard_size", "dequantize", "fake_quantize", "quantize"]
__all__ += ["linear_cross_entropy"]
__all__ += ["s2ft_linear", "quant_weight_linear"]
__all__ += ["givens_rotation"]
from .expert_lora import expert_lora

__all__ += ["expert_lora"]
from .lofit_linear import lofit_linear

__all__ += ["lofit_linear"]
from .sparse_delta_linear import SparseSupport, sampled_gradient, sparse_delta_linear, sparse_support

__all__ += ["SparseSupport", "sampled_gradient", "sparse_delta_linear", "sparse_support"]
from .expert_dora import expert_dora
from .lora_weight import lora_weight

__all__ += ["expert_dora", "lora_weight"]
