"""Findings of the adversarial review of the core (format, ops, pruning, config), each now an error or right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mustafar
from mustafar.format import BitmapKV
from mustafar.ops import compress_into, sparse_decode_attention, triton_available


def _stores(seed=0, tokens=40, d=16):
    gen = torch.Generator().manual_seed(seed)
    return (mustafar.compress(torch.randn(1, 2, tokens, d, generator=gen), 0.5),
            mustafar.compress(torch.randn(1, 2, tokens, d, generator=gen), 0.5))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_decode_honours_non_contiguous_rows():
    gen = torch.Generator().manual_seed(1)
    keys, values = _stores()
    query = torch.randn(1, 4, 1, 32, generator=gen)[..., ::2]
    window = lambda: torch.randn(1, 2, 3, 16, generator=gen).transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa
    kw, vw = window(), window()
    out = sparse_decode_attention(query, keys, values, kw, vw, backend="triton")
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_fully_masked_additive_row_matches_torch():
    """A row masked with finfo.min everywhere gives zeros on both backends (the one rule of issue 17; it gave
    SDPA's uniform softmax before, while an all-False bool row gave zeros)."""
    keys, values = _stores(2)
    query = torch.randn(1, 4, 1, 16)
    mask = torch.full((1, 1, 1, 40), torch.finfo(torch.float32).min)
    out = sparse_decode_attention(query, keys, values, backend="triton", attention_mask=mask)
    ref = sparse_decode_attention(query, keys, values, backend="torch", attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("bad,error,match", [
    (dict(offset=4), ValueError, "capacity"),
    (dict(offset=-2), ValueError, "offset"),
    (dict(values=torch.zeros(1, 2, 5, 3)), ValueError, "values must be"),
    (dict(values=torch.zeros(2, 2, 5, 4)), ValueError, "values must be"),
    (dict(values=torch.zeros(1, 2, 5, 4, dtype=torch.float16)), TypeError, "values"),
    (dict(bitmaps=torch.zeros(1, 2, 5, 1, dtype=torch.int32)), TypeError, "bitmaps"),
    (dict(values=torch.zeros(1, 2, 4, 5).transpose(-1, -2)), ValueError, "contiguous rows"),
])
def test_compress_into_rejects_bad_buffers(bad, error, match):
    args = dict(x=torch.randn(1, 2, 3, 8), sparsity=0.5, values=torch.zeros(1, 2, 5, 4),
                bitmaps=torch.zeros(1, 2, 5, 1, dtype=torch.int64), offset=0)
    args.update(bad)
    with pytest.raises(error, match=match):
        compress_into(**args, backend="torch")


@pytest.mark.parametrize("bits", [1, 255, -1, 0xF00])
def test_bitmapkv_rejects_rows_that_are_not_the_format(bits):
    with pytest.raises(ValueError, match="k_keep=4 bits"):
        BitmapKV(torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2, 1), bits, dtype=torch.int64), 8, 0.5)
    store = BitmapKV.empty(1, 1, 8, 0.5, torch.float32)
    with pytest.raises(ValueError, match="k_keep=4 bits"):
        store.append_compressed(torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2, 1), bits, dtype=torch.int64))


def test_bitmapkv_checks_devices_heads_and_head_dim_type():
    with pytest.raises(ValueError, match="device"):
        BitmapKV(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 1, dtype=torch.int64, device="meta"), 8, 0.5)
    with pytest.raises(ValueError, match="kv_heads >= 1"):
        BitmapKV(torch.zeros(1, 0, 2, 4), torch.zeros(1, 0, 2, 1, dtype=torch.int64), 8, 0.5)
    with pytest.raises(TypeError, match="head_dim"):
        BitmapKV.empty(1, 1, 8.0, 0.5)
    store = BitmapKV.empty(1, 1, 8, 0.5, torch.float32)
    with pytest.raises(ValueError, match="device"):
        store.append(torch.zeros(1, 1, 2, 8, device="meta"))


def test_select_batch_checks_its_index():
    store, _ = _stores()
    for bad, error in ((torch.tensor([True, False]), TypeError), ([0], TypeError), (torch.tensor([[0]]), TypeError),
                       (torch.tensor([1]), ValueError), (torch.tensor([-1]), ValueError),
                       (torch.tensor([], dtype=torch.long), ValueError)):
        with pytest.raises(error, match="index"):
            store.select_batch(bad)


def test_truncate_keeps_python_ints():
    store, _ = _stores()
    store.truncate(np.int64(5))
    assert type(store.tokens) is int and store.tokens == 5


def test_output_aware_and_think_need_a_query():
    keys = torch.randn(1, 2, 3, 8)
    for prune in (mustafar.prune_output_aware, mustafar.prune_think):
        with pytest.raises(ValueError, match="q_len >= 1"):
            prune(keys, 0.5, torch.randn(1, 2, 0, 8))


def test_float32_sparsity_counts_as_its_decimal():
    assert mustafar.keep_count(80, np.float32(0.7)) == 24 == mustafar.keep_count(80, 0.7)
    assert mustafar.SparsityConfig(float(np.float32(0.7)), 0.5).name == "K0.7V0.5"
    assert mustafar.keep_count(17, 2 / 17) == 15  # a float64 fraction is not snapped


def test_sizes_validate_their_arguments():
    with pytest.raises(ValueError, match="size"):
        mustafar.keep_count(-1, 0.5)
    with pytest.raises(TypeError, match="size"):
        mustafar.keep_count(5.5, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        mustafar.bytes_per_token(300, 0.7)
    with pytest.raises(TypeError, match="dtype"):
        mustafar.bytes_per_token(64, 0.7, torch.int8)


def test_scale_must_be_a_number():
    keys, values = _stores()
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


def test_setting_names_are_ascii():
    for name in ("K０.5V0.5", "K٠.5V0.5"):
        with pytest.raises(ValueError, match="K0.5V0.5"):
            mustafar.parse_setting(name)
    with pytest.raises(TypeError, match="method"):
        mustafar.SparsityConfig(0.5, 0.5, method=["per-token"])


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_nan_in_a_key_is_not_silently_zeroed():
    """A NaN in the cache shows as NaN in the heads that read it, on every backend (never a silent zero)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 40, 16, generator=gen)
    x[0, 0, 3, 2] = float("nan")
    keys, values = mustafar.compress(x, 0.5), mustafar.compress(torch.randn(1, 2, 40, 16, generator=gen), 0.5)
    query = torch.randn(1, 4, 1, 16, generator=gen)
    for backend in ("torch", "triton"):
        out = sparse_decode_attention(query, keys, values, backend=backend)
        assert out[0, :2].isnan().all() and not out[0, 2:].isnan().any()
