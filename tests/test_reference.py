"""Reference decode attention (``backend="torch"``) against a direct fp64 computation, and its input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randn, random_stores

import mustafar
from mustafar.format import BitmapKV
from mustafar.ops import available_backends, sparse_decode_attention
from mustafar.reference import compress_reference, decompress_reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest error allowed, relative to the largest output magnitude, per query dtype (fp64 oracle).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}



def oracle_attention(query, keys, values, scale, mask=None):
    """Attention in fp64, written out: GQA by repeating KV heads, causal among the last ``q_len`` tokens.

    ``mask``: bool (True = attend) or additive float, broadcastable to ``[b, q_heads, q_len, t]``.
    Rows with no visible key give zeros.
    """
    b, hq, lq, d = query.shape
    t = keys.shape[2]
    group = hq // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scale
    allowed = torch.arange(t)[None, :] <= t - lq + torch.arange(lq)[:, None]
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        scores = scores + mask.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    visible = (scores > float("-inf")).any(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(visible, scores.amax(-1, keepdim=True), 0.0))
    out = (weights @ v) / weights.sum(-1, keepdim=True)
    return torch.where(visible, out, 0.0)


def rel_error(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def make_case(batch, kv_heads, group, tokens, window, q_len, head_dim, dtype, seed):
    """Query, compressed K (s=0.5) and V (s=0.7) caches, optional dense windows."""
    query = randn((batch, kv_heads * group, q_len, head_dim), seed, dtype)
    key_cache = mustafar.compress(randn((batch, kv_heads, tokens, head_dim), seed + 1, dtype), 0.5)
    value_cache = mustafar.compress(randn((batch, kv_heads, tokens, head_dim), seed + 2, dtype), 0.7)
    windows = (None, None)
    if window:
        windows = tuple(randn((batch, kv_heads, window, head_dim), seed + i, dtype) for i in (3, 4))
    return query, key_cache, value_cache, windows


def dense_kv(key_cache, value_cache, windows):
    keys, values = key_cache.decompress(), value_cache.decompress()
    if windows[0] is not None:
        keys, values = torch.cat([keys, windows[0]], 2), torch.cat([values, windows[1]], 2)
    return keys, values


def masks(batch, q_heads, q_len, total, seed):
    """None, a per-head bool mask, an additive mask broadcast over queries with -inf entries."""
    g = torch.Generator().manual_seed(seed)
    bool_mask = torch.rand((batch, q_heads, q_len, total), generator=g) < 0.8
    additive = torch.randn((batch, 1, 1, total), generator=g) * 2
    additive = additive.masked_fill(torch.rand((batch, 1, 1, total), generator=g) < 0.2, float("-inf"))
    return {"none": None, "bool": bool_mask, "additive": additive}


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("group", range(1, 9), ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("batch", (1, 3), ids=lambda b: f"b{b}")
@pytest.mark.parametrize("window", (0, 7), ids=lambda w: f"win{w}")
@pytest.mark.parametrize("q_len", (1, 4), ids=lambda q: f"q{q}")
def test_matches_fp64_oracle_fp32(group, batch, window, q_len):
    seed = ((group * 3 + batch) * 11 + window) * 5 + q_len
    kv_heads, tokens, head_dim = 2, 37, 64
    query, key_cache, value_cache, windows = make_case(batch, kv_heads, group, tokens, window, q_len, head_dim,
                                                       torch.float32, seed)
    keys, values = dense_kv(key_cache, value_cache, windows)
    for kind, mask in masks(batch, kv_heads * group, q_len, tokens + window, seed).items():
        out = mustafar.sparse_decode_attention(query, key_cache, value_cache, *windows, backend="torch",
                                               attention_mask=mask)
        assert out.shape == query.shape and out.dtype == torch.float32
        assert not out.isnan().any(), kind
        assert rel_error(out, oracle_attention(query, keys, values, head_dim**-0.5, mask)) < 1e-5, kind


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("head_dim", (80, 128, 256))
def test_matches_fp64_oracle_per_dtype(dtype, head_dim):
    seed = head_dim + DTYPES.index(dtype)
    query, key_cache, value_cache, windows = make_case(3, 2, 4, 65, 16, 4, head_dim, dtype, seed)
    out = mustafar.sparse_decode_attention(query, key_cache, value_cache, *windows, backend="torch", scale=0.3)
    assert out.dtype == dtype
    keys, values = dense_kv(key_cache, value_cache, windows)
    assert rel_error(out, oracle_attention(query, keys, values, 0.3)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("q_len", (1, 4), ids=lambda q: f"q{q}")
def test_sparsity_zero_equals_dense_sdpa(dtype, q_len):
    b, hkv, group, t, d = 3, 2, 4, 63, 128
    seed = 10 * q_len + DTYPES.index(dtype)
    query = randn((b, hkv * group, q_len, d), seed, dtype)
    keys, values = randn((b, hkv, t, d), seed + 1, dtype), randn((b, hkv, t, d), seed + 2, dtype)
    key_cache, value_cache = mustafar.compress(keys, 0.0), mustafar.compress(values, 0.0)
    out = mustafar.sparse_decode_attention(query, key_cache, value_cache, backend="torch")
    causal = torch.arange(t)[None, :] <= t - q_len + torch.arange(q_len)[:, None]
    q32, k32, v32 = query.float(), keys.float(), values.float()
    dense_gqa = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=causal, enable_gqa=True)
    dense_repeat = F.scaled_dot_product_attention(
        q32, k32.repeat_interleave(group, 1), v32.repeat_interleave(group, 1), attn_mask=causal
    )
    tolerance = max(TOLERANCE[dtype], 1e-6)
    assert rel_error(out, dense_gqa.double()) < tolerance
    assert rel_error(out, dense_repeat.double()) < tolerance


def test_empty_store_with_window_is_dense_attention():
    query = randn((1, 6, 1, 64), 1)
    key_cache = mustafar.compress(randn((1, 2, 0, 64), 2), 0.7)
    value_cache = BitmapKV.empty(1, 2, 64, 0.5, torch.float32)
    kw, vw = randn((1, 2, 5, 64), 3), randn((1, 2, 5, 64), 4)
    out = mustafar.sparse_decode_attention(query, key_cache, value_cache, kw, vw, backend="torch")
    assert rel_error(out, oracle_attention(query, kw, vw, 64**-0.5)) < 1e-5


def test_sparsity_is_applied():
    """The reference attends over the pruned cache, not the dense keys."""
    query = randn((1, 4, 1, 64), 5)
    keys, values = randn((1, 1, 30, 64), 6), randn((1, 1, 30, 64), 7)
    out = mustafar.sparse_decode_attention(query, mustafar.compress(keys, 0.7), mustafar.compress(values, 0.7),
                                           backend="torch")
    pruned = oracle_attention(query, mustafar.prune_per_token(keys, 0.7), mustafar.prune_per_token(values, 0.7),
                              64**-0.5)
    assert rel_error(out, pruned) < 1e-5
    assert rel_error(out, oracle_attention(query, keys, values, 64**-0.5)) > 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_fully_masked_rows_give_zeros(dtype):
    query, key_cache, value_cache, windows = make_case(2, 2, 3, 20, 4, 2, 64, dtype, 9)
    bool_mask = torch.ones(2, 6, 2, 24, dtype=torch.bool)
    bool_mask[1, 4, 0] = False  # one (batch, head, query) row sees nothing
    additive = torch.zeros(2, 6, 2, 24)
    additive[0, :, 1] = float("-inf")  # every head of one query of batch 0
    for mask, dead in ((bool_mask, (1, 4, 0)), (additive, (0, slice(None), 1))):
        out = mustafar.sparse_decode_attention(query, key_cache, value_cache, *windows, backend="torch",
                                               attention_mask=mask)
        assert not out.isnan().any()
        assert bool((out[dead] == 0).all())
        alive = torch.ones(out.shape[:3], dtype=torch.bool)
        alive[dead] = False
        assert bool((out[alive].abs().sum(-1) > 0).all())


def test_default_scale_and_custom_scale():
    query, key_cache, value_cache, windows = make_case(1, 1, 2, 10, 0, 1, 96, torch.float32, 11)
    keys, values = dense_kv(key_cache, value_cache, windows)
    default = mustafar.sparse_decode_attention(query, key_cache, value_cache, backend="torch")
    assert rel_error(default, oracle_attention(query, keys, values, 96**-0.5)) < 1e-5
    custom = mustafar.sparse_decode_attention(query, key_cache, value_cache, scale=2.0, backend="torch")
    assert rel_error(custom, oracle_attention(query, keys, values, 2.0)) < 1e-5


def test_reference_functions_round_trip_any_leading_shape():
    x = randn((5, 3, 80), 12, torch.bfloat16)
    vals, bits = compress_reference(x, 0.7)
    assert vals.shape == (5, 3, 80 - 56) and bits.shape == (5, 3, 2)
    assert torch.equal(decompress_reference(vals, bits, 80), mustafar.prune_per_token(x[None], 0.7)[0])


# ----------------------------------------------------------------- bad input
def case(dtype=torch.float32, q_heads=4, q_len=1, tokens=6, window=2):
    query, key_cache, value_cache, windows = make_case(1, 2, q_heads // 2, tokens, window, q_len, 64, dtype, 13)
    if q_heads % 2:
        query = randn((1, q_heads, q_len, 64), 14, dtype)
    return query, key_cache, value_cache, windows


def attend(query, key_cache, value_cache, key_window=None, value_window=None, **kwargs):
    kwargs.setdefault("backend", "torch")
    return mustafar.sparse_decode_attention(query, key_cache, value_cache, key_window, value_window, **kwargs)


def test_bad_query_head_count():
    query, kc, vc, _ = case()
    with pytest.raises(ValueError, match="kv_heads"):
        attend(randn((1, 3, 1, 64), 15), kc, vc)


def test_dtype_mismatches():
    query, kc, vc, (kw, vw) = case()
    with pytest.raises(TypeError, match="key_cache"):
        attend(query.half(), kc, vc)
    half_values = mustafar.compress(randn((1, 2, 6, 64), 16, torch.float16), 0.7)
    with pytest.raises(TypeError, match="value_cache"):
        attend(query, kc, half_values)
    with pytest.raises(TypeError, match="key_window"):
        attend(query, kc, vc, kw.bfloat16(), vw)
    with pytest.raises(TypeError, match="value_window"):
        attend(query, kc, vc, kw, vw.half())
    with pytest.raises(TypeError, match="query"):
        attend(query.double(), kc, vc)


def test_wrong_ranks_and_shapes():
    query, kc, vc, (kw, vw) = case()
    with pytest.raises(ValueError, match="query must have 4 dimensions"):
        attend(query[0], kc, vc)
    with pytest.raises(ValueError, match="key_window must have 4 dimensions"):
        attend(query, kc, vc, kw[0], vw)
    with pytest.raises(ValueError, match="value_window"):
        attend(query, kc, vc, kw, vw[:, :, :1])
    with pytest.raises(ValueError, match="key_window"):
        attend(query, kc, vc, kw[:, :1], vw[:, :1])
    with pytest.raises(ValueError, match="key_cache"):
        attend(randn((1, 4, 1, 80), 17), kc, vc)
    with pytest.raises(ValueError, match="value_cache"):
        attend(query, kc, mustafar.compress(randn((1, 2, 5, 64), 18), 0.7))


def test_non_bitmap_caches():
    query, kc, vc, _ = case()
    with pytest.raises(TypeError, match="key_cache must be a mustafar.BitmapKV"):
        attend(query, kc.decompress(), vc)
    with pytest.raises(TypeError, match="value_cache must be a mustafar.BitmapKV"):
        attend(query, kc, None)


def test_window_given_alone():
    query, kc, vc, (kw, vw) = case()
    with pytest.raises(ValueError, match="key_window and value_window"):
        attend(query, kc, vc, kw, None)
    with pytest.raises(ValueError, match="key_window and value_window"):
        attend(query, kc, vc, None, vw)


def test_bad_backend(monkeypatch):
    query, kc, vc, _ = case()
    for backend in ("cpu", "Torch", "", None):
        with pytest.raises(ValueError, match="backend"):
            attend(query, kc, vc, backend=backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert available_backends() == ["torch"]
        with pytest.raises(RuntimeError, match="backend='triton'"):
            attend(query, kc, vc, backend="triton")


def test_bad_attention_mask():
    query, kc, vc, (kw, vw) = case(q_len=2)
    total = 6 + 2
    for shape in ((1, 4, 2, total + 1), (2, 4, 2, total), (1, 3, 2, total), (1, 4, 3, total), (1, 1, 1, 1, total)):
        with pytest.raises(ValueError, match="attention_mask"):
            attend(query, kc, vc, kw, vw, attention_mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must have 4 dimensions"):
        attend(query, kc, vc, kw, vw, attention_mask=torch.ones(1, total, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        attend(query, kc, vc, kw, vw, attention_mask=torch.ones(1, 1, 2, total, dtype=torch.int64))
    broadcast = torch.ones(1, 1, 1, total, dtype=torch.bool)
    assert attend(query, kc, vc, kw, vw, attention_mask=broadcast).shape == query.shape


def test_q_len_larger_than_tokens():
    query, kc, vc, (kw, vw) = case(q_len=9)
    with pytest.raises(ValueError, match="q_len"):
        attend(query, kc, vc, kw, vw)
    query, kc, vc, _ = case(q_len=7, window=0)
    with pytest.raises(ValueError, match="q_len"):
        attend(query, kc, vc)


def test_bad_scale():
    query, kc, vc, _ = case()
    with pytest.raises(ValueError, match="scale"):
        attend(query, kc, vc, scale=float("nan"))


def test_device_mismatch():
    query, kc, vc, (kw, vw) = case()
    with pytest.raises(ValueError, match="key_window"):
        attend(query, kc, vc, kw.to("meta"), vw.to("meta"))
    meta = BitmapKV.empty(1, 2, 64, 0.5, dtype=torch.float32, device="meta", capacity=6)
    with pytest.raises(ValueError, match="key_cache"):
        attend(query, meta, vc)


def test_scale_must_be_a_number():
    keys, values = random_stores()
    query = torch.randn(1, 4, 1, 16)
    for bad in ("0.25", True):
        with pytest.raises(TypeError, match="scale"):
            sparse_decode_attention(query, keys, values, scale=bad)


def test_empty_batch_attention_is_empty():
    keys = BitmapKV.empty(0 + 1, 2, 16, 0.5, torch.float32)
    keys.append(torch.randn(1, 2, 4, 16))
    empty = BitmapKV(keys.values[:0], keys.bitmaps[:0], 16, 0.5)
    out = sparse_decode_attention(torch.randn(0, 4, 1, 16), empty, empty)
    assert out.shape == (0, 4, 1, 16)
