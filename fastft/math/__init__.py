"""Pure math at the bottom of fastft: Hadamard factorizations and quantization grids.

Everything in fastft may import it; it imports nothing of fastft but itself (no torch.library op, no backend).
"""
