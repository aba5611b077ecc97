"""FP8 (e4m3) kept values in the format (issue 15): the rule, the round trip, the bitmap, the bytes, bad inputs.

The oracle :func:`fp8_oracle` is written from the rule in :mod:`mustafar.fp8`'s docstring on top of
``prune_per_token``; the store (reference and Triton compress) must equal it bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import mustafar
from mustafar import BitmapKV, bytes_per_token, compress, keep_count, prune_per_token
from mustafar.fp8 import E4M3_MAX, check_kept_dtype
from mustafar.format import num_words
from mustafar.launch.common import interpreting
from mustafar.ops import UnsupportedHardwareError, compress_into

FP8 = torch.float8_e4m3fn
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton on CPU tensors runs in the interpreter only; tests/test_gpu_fp8.py runs it on a GPU
BACKENDS = ["torch"] + (["triton"] if interpreting() else [])


def fp8_oracle(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token pruning, then e4m3 quantise-dequantise with ``scale = max kept |x| / 448`` (the stated rule)."""
    pruned = prune_per_token(x, sparsity)
    kept = pruned != 0
    amax = pruned.abs().amax(-1, keepdim=True)
    scale = (amax.float() / 448.0).to(x.dtype)
    scale = torch.where(amax == 0, 0.0, torch.clamp(scale, min=torch.finfo(x.dtype).tiny)).to(x.dtype)
    scale = torch.where(torch.isfinite(amax), scale, float("nan")).to(x.dtype)
    divisor = torch.where(scale == 0, 1.0, scale.float())
    q = torch.clamp(pruned.float() / divisor, -448.0, 448.0).to(FP8)
    limit = torch.finfo(x.dtype).max
    back = torch.clamp(q.float() * scale.float(), -limit, limit).to(x.dtype)
    return torch.where(kept, back, torch.zeros((), dtype=x.dtype))


def _data(shape, dtype, seed):
    """Normal data with per-token magnitudes over many binades (e4m3 subnormals and fp16 extremes included)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-14, 10, (*shape[:-1], 1), generator=gen))
    return x.to(dtype)


def _store(x, sparsity, backend):
    b, h, t, d = x.shape
    store = BitmapKV.empty(b, h, d, sparsity, dtype=x.dtype, capacity=t, kept_dtype=FP8)
    values, bitmaps = store.storage
    compress_into(x, sparsity, values, bitmaps, 0, backend=backend, scales=store.scale_storage)
    store._tokens = t
    return store


CASES = [(d, s, dt) for d, s, dt in itertools.product((64, 80, 96, 128, 256), (0.0, 0.5, 0.7), DTYPES)
         if (d // 16 + int(10 * s) + DTYPES.index(dt)) % 2 == 0 or d == 128]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim,sparsity,dtype", CASES)
def test_round_trip_equals_prune_then_quantise(backend, head_dim, sparsity, dtype):
    x = _data((3, 2, 65, head_dim), dtype, seed=head_dim + int(100 * sparsity))
    store = _store(x, sparsity, backend)
    out = store.decompress()
    assert out.dtype == dtype and store.values.dtype == FP8 and store.scales.dtype == dtype
    assert torch.equal(out, fp8_oracle(x, sparsity))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_is_the_cache_dtype_bitmap_and_backends_agree_bit_for_bit(dtype):
    x = _data((2, 3, 63, 128), dtype, seed=7)
    fp8 = compress(x, 0.7, kept_dtype=FP8)
    assert torch.equal(fp8.bitmaps, compress(x, 0.7).bitmaps)
    for backend in BACKENDS:
        other = _store(x, 0.7, backend)
        assert torch.equal(other.bitmaps, fp8.bitmaps)
        assert torch.equal(other.values.view(torch.uint8), fp8.values.view(torch.uint8))
        assert torch.equal(other.scales, fp8.scales)


def test_e4m3_cast_rounds_to_nearest_even_on_the_grid():
    """The rule's cast (torch's) against an explicit e4m3 grid: nearest value, ties to the even code."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # non-negative finite codes
    grid = codes.view(FP8).float()
    gen = torch.Generator().manual_seed(3)
    midpoints = (grid[1:] + grid[:-1]) / 2
    y = torch.cat([torch.rand(4000, generator=gen) * E4M3_MAX, torch.rand(1000, generator=gen) / 64, midpoints])
    distance = (y[:, None] - grid[None, :]).abs()
    best = distance.min(dim=1, keepdim=True).values
    candidates = (distance == best) & ((codes[None, :] % 2 == 0) | ((distance == best).sum(1, keepdim=True) == 1))
    expected = grid[candidates.float().argmax(dim=1)]
    assert torch.equal(y.to(FP8).float(), expected)
    assert torch.equal((-y).to(FP8).float(), -expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tiny_and_huge_tokens(backend, dtype):
    """All-zero tokens: scale 0, zeros back; tiny tokens: scale floored at the smallest normal; huge: finite."""
    x = _data((1, 2, 8, 64), dtype, seed=11)
    finfo = torch.finfo(dtype)
    x[0, 0, 0] = 0
    x[0, 0, 1] = (torch.randn(64) * finfo.tiny * 4).to(dtype)
    x[0, 1, 2] = (torch.randn(64).sign() * finfo.max).to(dtype)
    store = _store(x, 0.5, backend)
    out = store.decompress()
    assert store.scales[0, 0, 0] == 0 and bool((out[0, 0, 0] == 0).all())
    assert store.scales[0, 0, 1] >= finfo.tiny
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out, fp8_oracle(x, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_tokens_give_nan_at_their_kept_channels_only(backend):
    x = _data((1, 2, 6, 64), torch.float16, seed=5)
    x[0, 0, 1, 3] = float("nan")
    x[0, 1, 4, 10] = float("inf")
    x[0, 1, 5, 11] = -float("inf")
    store = _store(x, 0.5, backend)
    out, kept = store.decompress(), compress(x, 0.5).decompress() != 0
    bad = torch.zeros(1, 2, 6, dtype=torch.bool)
    bad[0, 0, 1] = bad[0, 1, 4] = bad[0, 1, 5] = True
    assert bool(store.scales[bad].isnan().all()) and bool(torch.isfinite(store.scales[~bad]).all())
    assert bool(out[bad][kept[bad]].isnan().all()) and bool((out[bad][~kept[bad]] == 0).all())
    assert torch.equal(out[~bad], fp8_oracle(x, 0.5)[~bad])


def test_nbytes_formula_and_memory_targets():
    for d, s, dt in itertools.product((64, 80, 128, 256), (0.0, 0.5, 0.7), DTYPES):
        itemsize = torch.empty((), dtype=dt).element_size()
        per_token = bytes_per_token(d, s, dt, kept_dtype=FP8)
        assert per_token == keep_count(d, s) + 8 * num_words(d) + itemsize
        assert bytes_per_token(d, s, dt, kept_dtype=dt) == bytes_per_token(d, s, dt)
        store = compress(_data((2, 3, 17, d), dt, seed=d), s, kept_dtype=FP8)
        assert store.nbytes == 2 * 3 * 17 * per_token
        assert store.dense_nbytes == 2 * 3 * 17 * d * itemsize
    dense = 2 * 128
    assert bytes_per_token(128, 0.7, kept_dtype=FP8) / dense <= 0.23  # issue 15 targets, head_dim 128, fp16
    assert bytes_per_token(128, 0.5, kept_dtype=FP8) / dense <= 0.33
    assert bytes_per_token(128, 0.0, kept_dtype=FP8) == 128 + 16 + 2


def test_store_edits_keep_scales_with_their_rows():
    x = _data((3, 2, 40, 64), torch.float16, seed=2)
    store = BitmapKV.empty(3, 2, 64, 0.7, dtype=torch.float16, kept_dtype=FP8)
    for piece in x.split([1, 7, 32], dim=2):  # appends grow the capacity
        store.append(piece)
    assert store.tokens == 40 and torch.equal(store.decompress(), fp8_oracle(x, 0.7))
    store.select_batch(torch.tensor([2, 0]))
    assert torch.equal(store.decompress(), fp8_oracle(x[[2, 0]], 0.7))
    other = BitmapKV.empty(2, 2, 64, 0.7, dtype=torch.float16, kept_dtype=FP8)
    other.append_compressed(store.values, store.bitmaps, store.scales)
    assert torch.equal(other.decompress(), store.decompress())
    store.truncate(5)
    assert store.scales.shape == (2, 2, 5) and "kept_dtype=float8_e4m3fn" in repr(store)


@pytest.mark.parametrize("bad", [torch.int8, torch.float8_e5m2, torch.uint8, "int8", 8])
def test_unsupported_kept_dtype_is_a_type_error_naming_it(bad):
    x = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    for make in (lambda: compress(x, 0.5, kept_dtype=bad), lambda: bytes_per_token(64, 0.5, kept_dtype=bad),
                 lambda: BitmapKV.empty(1, 1, 64, 0.5, kept_dtype=bad),
                 lambda: mustafar.MustafarCache(0.5, 0.5, kept_dtype=bad),
                 lambda: mustafar.StaticMustafarCache(max_tokens=8, kept_dtype=bad),
                 lambda: mustafar.SparsityConfig(kept_dtype=bad)):
        with pytest.raises(TypeError, match="kept_dtype") as error:
            make()
        assert repr(bad) in str(error.value) or str(bad) in str(error.value)


def test_kept_dtype_other_than_the_cache_dtype_is_refused():
    x = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="kept_dtype .*bfloat16.*float16"):
        compress(x, 0.5, kept_dtype=torch.float16)
    assert compress(x, 0.5, kept_dtype=torch.bfloat16).scales is None  # the cache dtype itself: no FP8


def test_fp8_on_a_torch_build_without_it(monkeypatch):
    import mustafar.fp8 as fp8

    monkeypatch.setattr(fp8, "FP8_DTYPE", None)
    with pytest.raises(TypeError, match="torch build with torch.float8_e4m3fn"):
        check_kept_dtype("fp8")
    with pytest.raises(TypeError, match="kept_dtype"):
        check_kept_dtype(torch.float8_e4m3fn)


def test_format_inputs_that_do_not_match():
    x = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    store = compress(x, 0.5, kept_dtype=FP8)
    with pytest.raises(TypeError, match="scales must be given"):
        BitmapKV(store.values, store.bitmaps, 64, 0.5)
    with pytest.raises(TypeError, match="scales are only for float8"):
        BitmapKV(compress(x, 0.5).values, store.bitmaps, 64, 0.5, scales=store.scales)
    with pytest.raises(ValueError, match="scales must be"):
        BitmapKV(store.values, store.bitmaps, 64, 0.5, scales=store.scales[:, :1])
    with pytest.raises(TypeError, match="scales must have the store's cache dtype"):
        store.append_compressed(store.values, store.bitmaps, store.scales.float())
    with pytest.raises(UnsupportedHardwareError, match="CUDA tensors"):  # CUDA writes FP8, on CUDA tensors
        values, bitmaps = store.storage
        compress_into(x, 0.5, values, bitmaps, 0, backend="cuda", scales=store.scale_storage)


@settings(max_examples=40, deadline=None)
@given(head_dim=st.sampled_from([1, 7, 64, 80, 96, 128, 256]), tokens=st.integers(1, 9),
       sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]), dtype=st.sampled_from(DTYPES),
       exponent=st.integers(-20, 12), seed=st.integers(0, 2**16))
def test_property_round_trip_and_bitmap(head_dim, tokens, sparsity, dtype, exponent, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 2, tokens, head_dim, generator=gen) * 2.0 ** exponent).to(dtype)
    store = compress(x, sparsity, kept_dtype=FP8)
    assert torch.equal(store.decompress(), fp8_oracle(x, sparsity))
    assert torch.equal(store.bitmaps, compress(x, sparsity).bitmaps)
    assert store.nbytes == 2 * tokens * bytes_per_token(head_dim, sparsity, dtype, kept_dtype=FP8)
