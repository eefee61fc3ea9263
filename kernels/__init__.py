"""Triton kernels of moelora, installed as the subpackage `moelora.kernels`."""
