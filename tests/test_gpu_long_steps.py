"""GPU: long attention steps of the dynamic cache (prefill chunks) decompress the store and run FlashAttention-2.

The decode kernels are for short steps; a 4096-token chunk over an FP8 store made the Triton kernel ask for
540 KB of shared memory on an H200 (2026-12-03). ``MustafarCache`` now serves steps of more than
``LONG_STEP_ROWS`` query rows per KV head by :func:`mustafar.cache.layer._expanded_attention`.
"""

from __future__ import annotations

import pytest
import torch

import mustafar
from helpers import prompt, tiny_model
from mustafar.cache.layer import LONG_STEP_ROWS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kept_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("chunk", [LONG_STEP_ROWS // 4 + 1, 300, 4096])
def test_prefill_chunk_on_cuda_matches_the_reference_backend(kept_dtype, chunk):
    """Llama-shaped heads (head_dim 128, GQA 4): a first prefill, then a chunk of ``chunk`` tokens; its logits
    equal those of ``backend="torch"`` (the PyTorch reference attention) within fp16 tolerance."""
    model = tiny_model(dtype=torch.float16, hidden_size=512, num_attention_heads=4, num_key_value_heads=1,
                       num_hidden_layers=2).cuda()
    ids = prompt(700 + chunk, seed=4).cuda()
    logits = []
    for backend in ("auto", "torch"):
        cache = mustafar.MustafarCache(0.7, 0.5, window=32, backend=backend, kept_dtype=kept_dtype)
        with torch.no_grad():
            model(ids[:, :700], past_key_values=cache)
            logits.append(model(ids[:, 700:], past_key_values=cache).logits.float())
    assert torch.isfinite(logits[0]).all()
    err = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
    assert err < 2e-2, err
