"""Test session setup (without a GPU, the Triton kernels run in Triton's CPU interpreter) and shared fixtures.

Shared helpers (tiny models, the oracle cache, random states) live in ``helpers.py``."""

import os

import pytest
import torch

# Tests run tiny tensors: on a small shared CPU one thread is several times faster than OpenMP spin-waits.
torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Read by triton.jit when a kernel module is imported, so it must be set before any of them is.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command loads the model (the checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")
    import mustafar.models

    monkeypatch.setattr(mustafar.models, "load_model", refuse)
