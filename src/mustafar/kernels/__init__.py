"""Triton kernels (``@triton.jit`` code only); launched by :mod:`mustafar.launch`."""
