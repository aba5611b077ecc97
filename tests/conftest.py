"""Test session setup: without a GPU, the Triton kernels run in Triton's CPU interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Read by triton.jit when a kernel module is imported, so it must be set before any of them is.
    os.environ.setdefault("TRITON_INTERPRET", "1")
