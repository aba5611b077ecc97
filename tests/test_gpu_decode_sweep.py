"""GPU sweep of the CUDA decode kernel against the PyTorch reference (issue 13): GQA groups, q_len 1-8, windows.

Skipped without CUDA. Every (group, q_len) with ``group * q_len <= 16`` runs on the CUDA kernel; larger ones
must be refused by ``backend="cuda"`` and served by ``"auto"`` through the fallback.
"""

from __future__ import annotations

import pytest
import torch

from mustafar import compress, sparse_decode_attention
from mustafar.launch.cuda import MAX_ROWS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _case(batch, kv_heads, group, q_len, tokens, window, head_dim, dtype, sparsity, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)  # noqa: E731
    query = rand(batch, kv_heads * group, q_len, head_dim)
    keys = compress(rand(batch, kv_heads, tokens, head_dim), sparsity)
    values = compress(rand(batch, kv_heads, tokens, head_dim), sparsity)
    kw = rand(batch, kv_heads, window, head_dim) if window else None
    vw = rand(batch, kv_heads, window, head_dim) if window else None
    return query, keys, values, kw, vw


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("q_len", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("window", [0, 32])
def test_gqa_and_q_len_sweep(dtype, group, q_len, window):
    case = _case(3, 2, group, q_len, 300, window, 128, dtype, 0.7, 100 * group + q_len)
    ref = sparse_decode_attention(*case, backend="torch")
    if group * q_len <= MAX_ROWS:
        out = sparse_decode_attention(*case, backend="cuda")
    else:
        out = sparse_decode_attention(*case, backend="auto")
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_full_size_32k(sparsity, head_dim):
    case = _case(1, 8, 4, 1, 32768 - 32, 32, head_dim, torch.float16, sparsity, 7)
    out = sparse_decode_attention(*case, backend="cuda")
    ref = sparse_decode_attention(*case, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("batch", [1, 3])
def test_awkward_token_counts(tokens, batch):
    case = _case(batch, 2, 4, 1, tokens, 32, 128, torch.bfloat16, 0.7, tokens)
    out = sparse_decode_attention(*case, backend="cuda")
    ref = sparse_decode_attention(*case, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.bfloat16]
