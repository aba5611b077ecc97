"""Test session setup: without a GPU, the Triton kernels run in Triton's CPU interpreter."""

import os

import torch

# Tests run tiny tensors: on a small shared CPU one thread is several times faster than OpenMP spin-waits.
torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Read by triton.jit when a kernel module is imported, so it must be set before any of them is.
    os.environ.setdefault("TRITON_INTERPRET", "1")
