"""One rule for fully masked query rows on every backend: zeros (issue 17, finding 2).

A query row none of whose keys it may attend (causality and the mask together) gives
zeros, as FlashAttention does: for a bool mask (all False), an additive float mask of
``-inf`` and one of the mask dtype's minimum (``torch.finfo(dtype).min``, what
transformers writes; any entry at or below half of it masks its key). Before issue 17
the Triton kernel returned the plain mean of V for an additive row (it clamped ``-inf``
to a large finite value) while the reference and the bool path returned zeros, and the
reference returned the mean for ``finfo.min`` rows. Each backend that runs on a CPU is
tested here (Triton under ``TRITON_INTERPRET=1``); the CUDA kernel is compared with the
reference in ``test_gpu_kernels.py`` (it takes bool masks only and returns zeros for them).
"""

import pytest
import torch

import mustafar
from mustafar import BitmapKV, sparse_decode_attention
from mustafar.reference import decode_attention_reference
from mustafar.cache.static_ops import static_decode_attention

BACKENDS = [b for b in ("torch", "triton") if b in mustafar.ops.available_backends()]
MASKS = ["bool", "neg_inf", "finfo_min", "finfo_min_fp16", "half_min"]


def case(seed, batch=3, q_heads=4, kv_heads=2, q_len=2, stored=70, window=5, head_dim=32, dtype=torch.float32,
         device="cpu"):
    """Random query, stores and window; returns ``(query, key_store, value_store, key_window, value_window)``."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)  # noqa: E731
    keys, values = rand(batch, kv_heads, stored, head_dim), rand(batch, kv_heads, stored, head_dim)
    stores = (BitmapKV.empty(batch, kv_heads, head_dim, 0.5, dtype, device),
              BitmapKV.empty(batch, kv_heads, head_dim, 0.3, dtype, device))
    stores[0].append(keys)
    stores[1].append(values)
    return (rand(batch, q_heads, q_len, head_dim), *stores, rand(batch, kv_heads, window, head_dim),
            rand(batch, kv_heads, window, head_dim))


def masked(kind, keep: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """The mask of ``kind`` whose attended entries are ``keep`` (bool ``[b, 1 or h, q, t]``).

    Additive masks hold a random bias on the attended entries (``bias``), else zeros there.
    """
    if kind == "bool":
        return keep
    dtype = torch.float16 if kind == "finfo_min_fp16" else torch.float32
    bias = torch.randn(keep.shape, generator=torch.Generator().manual_seed(5)).to(dtype) * bias
    fill = {"neg_inf": -torch.inf, "half_min": torch.finfo(dtype).min / 2}.get(kind, torch.finfo(dtype).min)
    return bias.masked_fill(~keep, fill)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASKS)
def test_fully_masked_rows_give_zeros(backend, kind):
    query, ks, vs, kw, vw = case(seed=1)
    b, hq, lq, _ = query.shape
    t = ks.tokens + kw.shape[2]
    keep = torch.rand(b, hq, lq, t, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[..., -1] = True
    keep[0, 1, 0] = False  # one query row (batch 0, head 1, first query) masked everywhere
    keep[2, :, 1] = False  # the second query of every head of batch 2
    keep[1, 3, 0, : t - lq + 1] = False  # batch 1, head 3, first query: every key it may see (causality + mask)
    mask = masked(kind, keep)
    out = sparse_decode_attention(query, ks, vs, kw, vw, backend=backend, attention_mask=mask)
    fully = ~keep.tril(t - lq).any(-1)  # [b, h, q]: no visible key left
    assert fully.sum() == 1 + 4 + 1
    assert torch.equal(out[fully], torch.zeros_like(out[fully]))
    additive = keep if kind == "bool" else torch.where(keep, mask.float(), -torch.inf)
    expected = decode_attention_reference(
        query, torch.cat([ks.decompress(), kw], 2), torch.cat([vs.decompress(), vw], 2), 32 ** -0.5, additive)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # the other rows: the -inf mask's answer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASKS)
def test_masks_of_one_meaning_give_one_answer_in_half_precision(backend, kind):
    """fp16 queries and caches: every way to write the same mask gives the bool mask's answer."""
    query, ks, vs, kw, vw = case(seed=3, q_len=1, dtype=torch.float16)
    b, hq, lq, _ = query.shape
    t = ks.tokens + kw.shape[2]
    keep = torch.rand(b, 1, lq, t, generator=torch.Generator().manual_seed(4)) > 0.5
    keep[1] = False
    expected = sparse_decode_attention(query, ks, vs, kw, vw, backend=backend, attention_mask=keep)
    out = sparse_decode_attention(query, ks, vs, kw, vw, backend=backend,
                                  attention_mask=masked(kind, keep, bias=False))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not out[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_through_the_cache_layer(backend):
    """The ``"mustafar"`` decode step with a user's 4-d additive mask: a fully masked row gives zeros."""
    from mustafar.cache import MustafarLayer

    layer = MustafarLayer(0.5, 0.5, window=3, chunk=4, backend=backend)
    k, v = torch.randn(2, 2, 21, 16), torch.randn(2, 2, 21, 16)
    layer.update(k[:, :, :20], v[:, :, :20])
    layer.consume()
    key, value = layer.update(k[:, :, 20:], v[:, :, 20:])
    layer.consume()
    mask = torch.zeros(2, 1, 1, 21)
    mask[1] = torch.finfo(torch.float32).min
    out = layer.attend(torch.randn(2, 4, 1, 16), key, value, None, mask)
    assert not out[1].any() and out[0].abs().sum() > 0


def test_static_path_with_no_token_gives_zeros():
    """The static decode path (reference form) follows the same rule: no token held, zeros."""
    query, ks, vs, kw, vw = case(seed=6, q_len=1)
    out = static_decode_attention(query, ks, vs, kw, vw, torch.zeros((), dtype=torch.int64), backend="torch")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("kind", MASKS)
def test_fully_masked_rows_give_zeros_on_the_gpu(backend, kind):
    """CUDA (bool masks; ``auto`` sends additive masks to Triton) and Triton on the GPU: the same zeros."""
    if backend == "cuda" and kind != "bool":
        pytest.skip("the CUDA kernel takes bool masks only")
    query, ks, vs, kw, vw = case(seed=7, q_len=2, head_dim=64, stored=200, dtype=torch.float16, device="cuda")
    b, hq, lq, _ = query.shape
    t = ks.tokens + kw.shape[2]
    keep = torch.rand(b, hq, lq, t, generator=torch.Generator().manual_seed(8)) > 0.3
    keep[..., -1] = True
    keep[0, 1, 0] = False
    keep[2, :, 1] = False
    mask = masked(kind, keep).cuda()
    out = sparse_decode_attention(query, ks, vs, kw, vw, backend=backend, attention_mask=mask)
    ref = sparse_decode_attention(query, ks, vs, kw, vw, backend="torch", attention_mask=mask)
    fully = ~keep.tril(t - lq).any(-1).cuda()
    assert torch.equal(out[fully], torch.zeros_like(out[fully]))
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)
