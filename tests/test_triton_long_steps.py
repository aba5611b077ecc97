"""Edge cases of the Triton decode's long-step split (``mustafar.launch.decode._in_pieces``) against the reference.

Small ``MAX_ROWS`` (monkeypatched) force the split at interpreter-friendly sizes: the cut at the store/window
boundary, inside the store, inside the window; queries as long as everything held; groups 1/3/7/8 and groups
larger than ``MAX_ROWS``; every broadcastable mask shape (bool, additive with ``-inf`` and fully masked rows,
float64); non-contiguous queries and windows; FP8 stores; stores that are views; an explicit ``num_splits``.
Each case also checks that the caller's stores keep their token counts and that the launches are the pieces.
"""

from __future__ import annotations

import pytest
import torch

import mustafar.launch.decode as launch_decode
from mustafar import compress
from mustafar.format import BitmapKV
from mustafar.ops import sparse_decode_attention, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
FP8 = getattr(torch, "float8_e4m3fn", None)


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _pieces(monkeypatch):
    """Record ``(q_len, store tokens, window)`` of every call of ``decode_attention_triton``."""
    calls = []
    original = launch_decode.decode_attention_triton

    def recording(query, keys, values, kw, *args, **kwargs):
        calls.append((query.shape[2], keys.tokens, 0 if kw is None else kw.shape[2]))
        return original(query, keys, values, kw, *args, **kwargs)

    monkeypatch.setattr(launch_decode, "decode_attention_triton", recording)
    return calls


def _mask(kind, b, hq, lq, total, dtype, gen):
    if kind is None:
        return None
    if kind == "b11T":
        return torch.rand(b, 1, 1, total, generator=gen) > 0.3
    if kind == "bhqT":
        return torch.rand(b, hq, lq, total, generator=gen) > 0.5
    if kind == "11qT":
        return torch.rand(1, 1, lq, total, generator=gen) > 0.3
    if kind == "bhq1":
        return torch.rand(b, hq, lq, 1, generator=gen) > 0.2  # whole rows masked, broadcast over the keys
    if kind == "bool_full_rows":
        mask = torch.ones(b, 1, lq, total, dtype=torch.bool)
        mask[..., ::3, :] = False
        return mask
    if kind == "additive_inf":
        mask = torch.randn(b, hq, lq, total, generator=gen).to(dtype)
        mask[torch.rand(b, hq, lq, total, generator=gen) > 0.6] = -float("inf")
        mask[:, :, 0] = -float("inf")  # a fully masked row in every piece's first
        mask[:, 0, -1] = -float("inf")
        return mask
    if kind == "additive_min":
        mask = torch.zeros(b, 1, 1, total, dtype=dtype)
        mask[..., 1::2] = torch.finfo(dtype).min
        return mask
    if kind == "float64":
        mask = torch.randn(b, 1, lq, total, generator=gen, dtype=torch.float64)
        mask[..., ::2] = torch.finfo(torch.float64).min
        return mask
    raise AssertionError(kind)


def _check(monkeypatch, batch, kv_heads, group, q_len, n_comp, window, max_rows, *, head_dim=16,
           dtype=torch.float32, kept_dtype=None, mask=None, sparsity=(0.5, 0.7), non_contiguous=False, seed=0):
    monkeypatch.setattr(launch_decode, "MAX_ROWS", max_rows)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    hq, d = kv_heads * group, head_dim
    query = rand(batch, hq, q_len, 2 * d)[..., ::2] if non_contiguous else rand(batch, hq, q_len, d)
    keys = compress(rand(batch, kv_heads, n_comp, d), sparsity[0], kept_dtype=kept_dtype)
    values = compress(rand(batch, kv_heads, n_comp, d), sparsity[1], kept_dtype=kept_dtype)
    kw = vw = None
    if window:
        if non_contiguous:
            kw = rand(batch, kv_heads, d, window).transpose(-1, -2)
            vw = rand(batch, kv_heads, window, 2 * d)[..., 1::2]
        else:
            kw, vw = rand(batch, kv_heads, window, d), rand(batch, kv_heads, window, d)
    total = n_comp + window
    attention_mask = _mask(mask, batch, hq, q_len, total, dtype, gen)
    calls = _pieces(monkeypatch)
    out = sparse_decode_attention(query, keys, values, kw, vw, backend="triton", attention_mask=attention_mask)
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch", attention_mask=attention_mask)
    assert (keys.tokens, values.tokens) == (n_comp, n_comp)  # the caller's stores are not truncated
    assert out.shape == query.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, ref) < TOL[dtype], _rel_err(out, ref)
    # The launches: the whole step, then the pieces, each seeing the tokens up to its last query.
    step = max(1, max_rows // group)
    if q_len > 1 and group * q_len > max_rows:
        expected = [(q_len, n_comp, window)]
        for start in range(0, q_len, step):
            end = total - q_len + min(q_len, start + step)
            expected.append((min(q_len, start + step) - start, min(end, n_comp), max(0, end - n_comp)))
        assert calls == expected
    else:
        assert calls == [(q_len, n_comp, window)]


# batch, kv_heads, group, q_len, n_comp, window, max_rows
SHAPES = [
    (1, 1, 1, 9, 0, 9, 4),     # no store: the queries are the whole window
    (1, 2, 3, 12, 12, 0, 8),   # store only, q_len = tokens held: every cut inside the store
    (3, 2, 2, 10, 10, 6, 8),   # a cut exactly at the store/window boundary (window cut to nothing)
    (1, 1, 7, 5, 3, 4, 8),     # group 7 > MAX_ROWS / 2: one query per launch
    (1, 1, 8, 3, 20, 2, 8),    # group 8 == MAX_ROWS
    (1, 1, 4, 5, 7, 3, 2),     # MAX_ROWS smaller than the group
    (3, 1, 3, 7, 4, 5, 6),     # q_len not a multiple of the piece (2, 2, 2, 1)
    (1, 2, 1, 13, 65, 0, 4),   # a long store cut near its end (across a 64-token block)
]


@pytest.mark.parametrize("batch,kv_heads,group,q_len,n_comp,window,max_rows", SHAPES)
@pytest.mark.parametrize("mask", [None, "bhqT", "additive_inf"])
def test_long_step_pieces_match_reference(monkeypatch, batch, kv_heads, group, q_len, n_comp, window, max_rows,
                                          mask):
    _check(monkeypatch, batch, kv_heads, group, q_len, n_comp, window, max_rows, mask=mask,
           seed=batch + group + q_len + n_comp + window)


@pytest.mark.parametrize("mask", ["b11T", "11qT", "bhq1", "bool_full_rows", "additive_min", "float64"])
def test_long_step_pieces_every_mask_shape(monkeypatch, mask):
    _check(monkeypatch, 2, 2, 3, 9, 6, 5, 6, mask=mask, dtype=torch.float16)


@pytest.mark.skipif(FP8 is None, reason="needs torch.float8_e4m3fn")
@pytest.mark.parametrize("window", [0, 4])
def test_long_step_pieces_fp8_and_uneven_sparsities(monkeypatch, window):
    _check(monkeypatch, 1, 2, 3, 8, 8, window, 6, kept_dtype=FP8, mask="b11T", sparsity=(0.0, 0.75),
           dtype=torch.float16, head_dim=32)


def test_long_step_pieces_non_contiguous_query_and_window(monkeypatch):
    _check(monkeypatch, 3, 1, 2, 9, 5, 7, 4, mask="11qT", non_contiguous=True, head_dim=32)


def test_long_step_pieces_of_stores_that_are_views(monkeypatch):
    """Stores over part of larger buffers (tokens from an offset, a batch row of a bigger store), with room
    past the tokens held: the pieces cut them without touching the caller's."""
    monkeypatch.setattr(launch_decode, "MAX_ROWS", 4)
    gen = torch.Generator().manual_seed(3)
    big_k, big_v = (compress(torch.randn(3, 2, 30, 16, generator=gen), s) for s in (0.5, 0.25))
    keys = BitmapKV(big_k.values[1:2, :, 5:20], big_k.bitmaps[1:2, :, 5:20], 16, 0.5)
    values = BitmapKV(big_v.values[1:2, :, 5:20], big_v.bitmaps[1:2, :, 5:20], 16, 0.25)
    grown = BitmapKV.empty(1, 2, 16, 0.5, torch.float32, capacity=64)
    grown.append(torch.randn(1, 2, 15, 16, generator=gen))
    query = torch.randn(1, 4, 10, 16, generator=gen)
    window = torch.randn(1, 2, 8, 16, generator=gen)
    for k, v in ((keys, values), (grown, values), (keys, keys)):
        out = sparse_decode_attention(query, k, v, window, window.flip(2), backend="triton")
        ref = sparse_decode_attention(query, k, v, window, window.flip(2), backend="torch")
        assert _rel_err(out, ref) < TOL[torch.float32]
        assert (k.tokens, v.tokens, big_k.tokens) == (15, 15, 30)


@pytest.mark.parametrize("num_splits", [1, 2, 64])
def test_long_step_pieces_with_num_splits(monkeypatch, num_splits):
    monkeypatch.setattr(launch_decode, "MAX_ROWS", 4)
    gen = torch.Generator().manual_seed(num_splits)
    keys, values = (compress(torch.randn(1, 1, 70, 16, generator=gen), 0.5) for _ in range(2))
    query = torch.randn(1, 2, 8, 16, generator=gen)
    kw, vw = torch.randn(1, 1, 3, 16, generator=gen), torch.randn(1, 1, 3, 16, generator=gen)
    out = launch_decode.decode_attention_triton(query, keys, values, kw, vw, 0.25, num_splits=num_splits)
    ref = sparse_decode_attention(query, keys, values, kw, vw, scale=0.25, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float32]
    assert keys.tokens == values.tokens == 70


@pytest.mark.skipif(FP8 is None, reason="needs torch.float8_e4m3fn")
@pytest.mark.parametrize("case", ["empty_window", "empty_fp8_store", "fp8_keys_fp16_values"])
def test_long_step_pieces_of_empty_operands_and_mixed_kept_dtypes(monkeypatch, case):
    """A zero-length window tensor, an empty FP8 store before a window, FP8 keys with cache-dtype values."""
    monkeypatch.setattr(launch_decode, "MAX_ROWS", 4)
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float32 if case == "empty_window" else torch.float16
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    n_comp, window = {"empty_window": (10, 0), "empty_fp8_store": (0, 9), "fp8_keys_fp16_values": (10, 2)}[case]
    keys = compress(rand(2, 1, n_comp, 16), 0.5, kept_dtype=None if case == "empty_window" else FP8)
    values = compress(rand(2, 1, n_comp, 16), 0.25, kept_dtype=FP8 if case == "empty_fp8_store" else None)
    kw, vw = rand(2, 1, window, 16), rand(2, 1, window, 16)
    query = rand(2, 2, 7, 16)
    out = sparse_decode_attention(query, keys, values, kw, vw, backend="triton")
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch")
    assert torch.isfinite(out).all() and _rel_err(out, ref) < TOL[dtype]
    assert keys.tokens == values.tokens == n_comp
