"""Triton kernels, installed as ``fastft.kernels``: one kernel family per file.

Nothing here knows about modules or models: each file takes plain tensors and launches kernels.
"""
