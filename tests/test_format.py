"""The bitmap format: exact round trip, the layout of DESIGN.md, memory figures, append and friends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import randn, random_stores
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mustafar
from mustafar import compress, prune_per_token
from mustafar.format import BitmapKV, bytes_per_token, dense_bytes_per_token, unpack_bitmaps
from mustafar.pruning import keep_count, per_token_mask

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Hypothesis settings and strategies of the property tests.
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_ST = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SPARSITY_ST = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
HEAD_DIMS = (1, 7, 64, 80, 96, 128, 256)
LENGTHS = (1, 63, 64, 65, 1000)
#: (batch, kv_heads) pairs: batch 1 and an odd batch, several head counts.
BATCH_HEADS = ((1, 3), (3, 1))



def randn_nonzero(shape, seed, dtype):
    """Seeded normal data with ``|x| >= 1e-3``, so that no entry rounds to zero in fp16/bf16."""
    x = randn(shape, seed)
    return (x + torch.full_like(x, 1e-3).copysign(x)).to(dtype)


def sparsities(head_dim):
    """0, the paper's settings, and one that leaves a single entry per token."""
    return (0.0, 0.5, 0.7, 1 - 0.5 / head_dim)


def independent_bitmaps(mask: torch.Tensor) -> torch.Tensor:
    """Words of a keep-mask ``[..., d]``: bit ``d % 64`` of word ``d // 64``, by int64 shifts (wraps at bit 63)."""
    d = mask.shape[-1]
    words = math.ceil(d / 64)
    channel = torch.arange(d)
    bits = mask.to(torch.int64) << (channel % 64)
    out = torch.zeros(*mask.shape[:-1], words, dtype=torch.int64)
    return out.index_add_(-1, channel // 64, bits)


def python_bitmaps(kept: set[int], head_dim: int) -> list[int]:
    """Words of one row from the set of kept channels, as signed int64, in pure Python."""
    words = []
    for w in range(math.ceil(head_dim / 64)):
        word = sum(1 << (d - 64 * w) for d in kept if 64 * w <= d < 64 * (w + 1))
        words.append(word - (1 << 64) if word >= 1 << 63 else word)
    return words


# ---------------------------------------------------------------- round trip
def grid():
    """Every (head_dim, tokens, dtype); the (batch, kv_heads) pair alternates so each appears with each."""
    for i, head_dim in enumerate(HEAD_DIMS):
        for j, tokens in enumerate(LENGTHS):
            for k, dtype in enumerate(DTYPES):
                batch, kv_heads = BATCH_HEADS[(i + j + k) % len(BATCH_HEADS)]
                name = str(dtype).replace("torch.", "")
                case_id = f"d{head_dim}-t{tokens}-{name}-b{batch}h{kv_heads}"
                yield pytest.param(head_dim, tokens, dtype, batch, kv_heads, id=case_id)


@pytest.mark.parametrize(("head_dim", "tokens", "dtype", "batch", "kv_heads"), list(grid()))
def test_round_trip_and_layout(head_dim, tokens, dtype, batch, kv_heads):
    seed = ((head_dim * 1009 + tokens) * 7 + DTYPES.index(dtype)) * 5 + batch
    x = randn_nonzero((batch, kv_heads, tokens, head_dim), seed, dtype)  # kept channels = non-zeros of pruned
    for sparsity in sparsities(head_dim):
        kv = mustafar.compress(x, sparsity)
        k_keep = head_dim - math.floor(sparsity * head_dim)
        assert kv.k_keep == k_keep and kv.shape == x.shape and kv.tokens == tokens
        pruned = mustafar.prune_per_token(x, sparsity)
        assert torch.equal(kv.decompress(), pruned)
        mask = pruned != 0
        assert bool((mask.sum(-1) == k_keep).all())
        assert kv.values.shape == (batch, kv_heads, tokens, k_keep) and kv.values.dtype == dtype
        assert torch.equal(kv.values, x[mask].reshape(batch, kv_heads, tokens, k_keep))  # ascending channels
        assert kv.bitmaps.shape == (batch, kv_heads, tokens, math.ceil(head_dim / 64))
        assert kv.bitmaps.dtype == torch.int64
        assert torch.equal(kv.bitmaps, independent_bitmaps(mask))
        if sparsity == 0.0:
            assert torch.equal(pruned, x)
    assert k_keep == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_round_trip_non_contiguous(dtype):
    x = randn((3, 65, 2, 80), seed=5, dtype=dtype).transpose(1, 2)  # [3, 2, 65, 80], a transposed view
    assert not x.is_contiguous()
    for sparsity in (0.0, 0.5, 0.7):
        kv = mustafar.compress(x, sparsity)
        assert torch.equal(kv.decompress(), mustafar.prune_per_token(x, sparsity))
        assert torch.equal(kv.values, mustafar.compress(x.contiguous(), sparsity).values)
    strided = randn((1, 2, 63, 256), seed=6, dtype=dtype)[..., ::2]  # head_dim 128 with stride 2
    kv = mustafar.compress(strided, 0.7)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(strided.contiguous(), 0.7))


@settings(max_examples=60, deadline=None)
@given(
    head_dim=st.integers(1, 256),
    tokens=st.integers(0, 9),
    sparsity=st.floats(0.0, 1.0, exclude_max=True),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(head_dim, tokens, sparsity, dtype, seed):
    x = randn((2, 1, tokens, head_dim), seed, dtype)
    kv = mustafar.compress(x, sparsity)
    assert kv.k_keep == keep_count(head_dim, sparsity)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(x, sparsity))
    assert torch.equal(kv.bitmaps, independent_bitmaps(per_token_mask(x, sparsity)))


# -------------------------------------------------------------------- layout
@pytest.mark.parametrize("head_dim", [1, 7, 63, 64, 65, 80, 127, 128, 129, 200, 256])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layout_against_pure_python(head_dim, sparsity):
    x = randn((1, 2, 5, head_dim), seed=head_dim * 10 + int(sparsity * 10))
    kv = mustafar.compress(x, sparsity)
    k = kv.k_keep
    for h in range(2):
        for t in range(5):
            row = x[0, h, t].tolist()
            kept = sorted(sorted(range(head_dim), key=lambda i: (-abs(row[i]), i))[:k])
            assert kv.values[0, h, t].tolist() == [row[d] for d in kept]
            assert kv.bitmaps[0, h, t].tolist() == python_bitmaps(set(kept), head_dim)


@pytest.mark.parametrize("head_dim", [64, 65, 128, 200, 256])
def test_sign_bit_channels(head_dim):
    """Channels 63, 127, ... sit in the sign bit of an int64 word."""
    x = randn((1, 1, 2, head_dim), seed=head_dim) * 0.01
    top = list(range(63, head_dim, 64))
    x[0, 0, 0, top] = 100.0
    x[0, 0, 1, head_dim - 1] = -100.0  # last channel (bit (head_dim - 1) % 64 of the last word)
    kv = mustafar.compress(x, 1 - 0.5 / head_dim)  # one entry per token
    words = kv.bitmaps[0, 0].tolist()
    assert words[0][0] == -(2**63)
    last = [0] * math.ceil(head_dim / 64)
    last[-1] = python_bitmaps({(head_dim - 1) % 64}, 64)[0]
    assert words[1] == last
    assert kv.values[0, 0].flatten().tolist() == [100.0, -100.0]
    kv = mustafar.compress(x, (head_dim - len(top)) / head_dim)  # keeps exactly the sign-bit channels
    assert kv.bitmaps[0, 0, 0].tolist() == [-(2**63)] * len(top) + [0] * (math.ceil(head_dim / 64) - len(top))
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(x, (head_dim - len(top)) / head_dim))


def test_tail_bits_past_head_dim_are_zero():
    x = randn((2, 2, 7, 80), seed=8)
    kv = mustafar.compress(x, 0.0)  # all 80 channels kept: word 1 holds bits 0..15 only
    assert bool((kv.bitmaps[..., 0] == -1).all())
    assert bool((kv.bitmaps[..., 1] == 2**16 - 1).all())


# -------------------------------------------------------------------- memory
def ratio_case(head_dim, sparsity):
    k_keep = head_dim - math.floor(sparsity * head_dim)
    per_token = 2 * k_keep + 8 * math.ceil(head_dim / 64)
    ratio = per_token / (2 * head_dim)
    case_id = f"fp16-d{head_dim}-s{sparsity}-{per_token}B-{ratio:.2%}"
    return pytest.param(head_dim, sparsity, per_token, ratio, id=case_id)


@pytest.mark.parametrize(
    ("head_dim", "sparsity", "per_token", "ratio"),
    [ratio_case(d, s) for d in (64, 128) for s in (0.5, 0.7)],
)
def test_memory_ratio_fp16(head_dim, sparsity, per_token, ratio):
    x = randn((3, 2, 65, head_dim), seed=head_dim, dtype=torch.float16)
    kv = mustafar.compress(x, sparsity)
    assert bytes_per_token(head_dim, sparsity, torch.float16) == per_token
    assert kv.nbytes == 3 * 2 * 65 * per_token
    assert kv.nbytes / kv.dense_nbytes == pytest.approx(ratio, abs=1e-12)


def test_memory_figures_of_design():
    assert bytes_per_token(128, 0.7) == 94 and 94 / dense_bytes_per_token(128) == pytest.approx(0.367, abs=5e-4)
    assert bytes_per_token(128, 0.5) == 144 and 144 / dense_bytes_per_token(128) == pytest.approx(0.563, abs=5e-4)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nbytes_formula(head_dim, dtype):
    b, h, t = 3, 2, 63
    itemsize = torch.empty((), dtype=dtype).element_size()
    for sparsity in sparsities(head_dim):
        kv = mustafar.compress(randn((b, h, t, head_dim), seed=head_dim, dtype=dtype), sparsity)
        k_keep = head_dim - math.floor(sparsity * head_dim)
        assert kv.nbytes == b * h * t * (k_keep * itemsize + 8 * math.ceil(head_dim / 64))
        assert kv.dense_nbytes == b * h * t * head_dim * itemsize
        assert kv.allocated_nbytes >= kv.nbytes


# -------------------------------------------------------------------- append
@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(0, 20), min_size=1, max_size=8),
    head_dim=st.sampled_from((7, 64, 80, 128)),
    sparsity=st.sampled_from((0.0, 0.5, 0.7)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_append_any_chunking_equals_compress_at_once(chunks, head_dim, sparsity, dtype, seed):
    x = randn((3, 2, sum(chunks), head_dim), seed, dtype)
    whole = mustafar.compress(x, sparsity)
    store = BitmapKV.empty(3, 2, head_dim, sparsity, dtype=dtype)
    start = 0
    for n in chunks:
        store.append(x[:, :, start : start + n])
        start += n
    assert store.tokens == whole.tokens == sum(chunks)
    assert torch.equal(store.values, whole.values) and torch.equal(store.bitmaps, whole.bitmaps)
    assert torch.equal(store.decompress(), mustafar.prune_per_token(x, sparsity))


def test_capacity_grows_geometrically():
    tokens = 1000
    x = randn((1, 2, tokens, 64), seed=9, dtype=torch.float16)
    store = BitmapKV.empty(1, 2, 64, 0.7, dtype=torch.float16)
    capacities = [store.capacity]
    for t in range(tokens):
        store.append(x[:, :, t : t + 1])
        if store.capacity != capacities[-1]:
            capacities.append(store.capacity)
    reallocations = len(capacities) - 1
    growth = mustafar.format.GROWTH
    assert reallocations <= math.ceil(math.log(tokens / mustafar.format.CAPACITY_GRANULE, growth)) + 1
    assert all(b <= max(growth * a, a + mustafar.format.CAPACITY_GRANULE) + 16 for a, b in zip(capacities, capacities[1:]))
    assert store.allocated_nbytes <= 1.25 * store.nbytes + 16 * store.nbytes // tokens
    assert torch.equal(store.decompress(), mustafar.prune_per_token(x, 0.7))


def test_a_long_store_grows_by_at_most_growth_max_tokens():
    """A 32k-token store (a long prompt) that starts decoding grows by 1024 tokens, not by 25 % (8k tokens)."""
    store = BitmapKV.empty(2, 1, 8, 0.5, dtype=torch.float16, capacity=32768)
    store.append(randn((2, 1, 32768, 8), seed=12, dtype=torch.float16))
    assert store.capacity == 32768
    store.append(randn((2, 1, 1, 8), seed=13, dtype=torch.float16))
    assert store.capacity == 32768 + mustafar.format.GROWTH_MAX_TOKENS == 33792
    store.reserve(40000)  # a request past one step is met exactly (rounded to the granule)
    assert store.capacity == 40000 and store.tokens == 32769


def test_reserve_keeps_contents():
    x = randn((1, 1, 10, 96), seed=10)
    kv = mustafar.compress(x, 0.5)
    capacity = kv.capacity
    assert capacity >= 10
    kv.reserve(5)
    assert kv.capacity == capacity
    kv.reserve(100)
    assert kv.capacity >= 100 and kv.tokens == 10
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(x, 0.5))


def test_append_non_contiguous():
    x = randn((2, 30, 3, 128), seed=11, dtype=torch.bfloat16).transpose(1, 2)
    store = mustafar.compress(x[:, :, :10], 0.7)
    store.append(x[:, :, 10:])
    assert torch.equal(store.decompress(), mustafar.prune_per_token(x, 0.7))


def test_empty_store():
    kv = mustafar.compress(randn((2, 3, 0, 80), seed=12), 0.5)
    assert kv.tokens == 0 and kv.nbytes == 0 and kv.shape == (2, 3, 0, 80)
    assert kv.decompress().shape == (2, 3, 0, 80)
    store = BitmapKV.empty(1, 2, 64, 0.5, capacity=16)
    assert store.capacity >= 16 and store.decompress().shape == (1, 2, 0, 64)
    assert "BitmapKV(shape=(1, 2, 0, 64)" in repr(store)


def test_first_tokens_is_a_view_that_leaves_the_store_alone():
    x = randn((2, 2, 10, 64), seed=14)
    kv = mustafar.compress(x, 0.7)
    head = kv.first_tokens(4)
    assert head.tokens == 4 and kv.tokens == 10 and head.values.data_ptr() == kv.values.data_ptr()
    assert torch.equal(head.decompress(), kv.decompress()[:, :, :4])
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 10\], got 11"):
        kv.first_tokens(11)


def test_truncate_then_append():
    x = randn((2, 2, 20, 64), seed=13)
    kv = mustafar.compress(x[:, :, :10], 0.7)
    kv.truncate(4)
    assert kv.tokens == 4 and kv.shape == (2, 2, 4, 64)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(x[:, :, :4], 0.7))
    kv.append(x[:, :, 10:20])
    expected = torch.cat([x[:, :, :4], x[:, :, 10:20]], dim=2)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(expected, 0.7))
    kv.truncate(0)
    assert kv.tokens == 0 and kv.nbytes == 0
    with pytest.raises(ValueError, match="tokens"):
        kv.truncate(1)
    with pytest.raises(ValueError, match="tokens"):
        kv.truncate(-1)
    with pytest.raises(TypeError, match="tokens"):
        kv.truncate(2.5)


def test_select_batch_reorders_and_repeats():
    x = randn((3, 2, 9, 80), seed=14, dtype=torch.float16)
    kv = mustafar.compress(x, 0.5)
    kv.select_batch(torch.tensor([2, 0, 0]))
    assert kv.shape == (3, 2, 9, 80)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(x[[2, 0, 0]], 0.5))
    more = randn((3, 2, 4, 80), seed=15, dtype=torch.float16)
    kv.append(more)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(torch.cat([x[[2, 0, 0]], more], 2), 0.5))
    kv.select_batch(torch.tensor([1]))
    assert kv.shape == (1, 2, 13, 80)
    assert torch.equal(kv.decompress(), mustafar.prune_per_token(torch.cat([x[[0]], more[[1]]], 2), 0.5))


def test_append_compressed():
    x = randn((2, 3, 40, 96), seed=16, dtype=torch.bfloat16)
    kv = mustafar.compress(x[:, :, :15], 0.7)
    tail = mustafar.compress(x[:, :, 15:], 0.7)
    kv.append_compressed(tail.values, tail.bitmaps)
    whole = mustafar.compress(x, 0.7)
    assert kv.tokens == 40
    assert torch.equal(kv.values, whole.values) and torch.equal(kv.bitmaps, whole.bitmaps)


# ----------------------------------------------------------------- bad input
def test_append_compressed_bad_input():
    kv = mustafar.compress(randn((2, 3, 5, 96), seed=17, dtype=torch.float16), 0.7)
    other = mustafar.compress(randn((2, 3, 4, 96), seed=18, dtype=torch.float16), 0.7)
    with pytest.raises(TypeError, match="values"):
        kv.append_compressed(other.values.float(), other.bitmaps)
    with pytest.raises(ValueError, match="values"):
        kv.append_compressed(other.values[..., :-1], other.bitmaps)
    with pytest.raises(ValueError, match="values"):
        kv.append_compressed(other.values[:1], other.bitmaps[:1])
    with pytest.raises(TypeError, match="bitmaps"):
        kv.append_compressed(other.values, other.bitmaps.int())
    with pytest.raises(ValueError, match="bitmaps"):
        kv.append_compressed(other.values, other.bitmaps[:, :, :3])
    with pytest.raises(ValueError, match="values must have 4 dimensions"):
        kv.append_compressed(other.values[0], other.bitmaps[0])
    assert kv.tokens == 5


def test_append_bad_rows():
    kv = BitmapKV.empty(2, 3, 64, 0.5, dtype=torch.float16)
    with pytest.raises(TypeError, match="x must have the store's dtype"):
        kv.append(randn((2, 3, 4, 64), seed=19))
    with pytest.raises(ValueError, match="x must be"):
        kv.append(randn((2, 2, 4, 64), seed=20, dtype=torch.float16))
    with pytest.raises(ValueError, match="x must be"):
        kv.append(randn((2, 3, 4, 80), seed=21, dtype=torch.float16))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        kv.append(randn((3, 4, 64), seed=22, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kv.append("rows")
    assert kv.tokens == 0


@pytest.mark.parametrize(
    ("sparsity", "error"),
    [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError), (False, TypeError), ("0.5", TypeError)],
    ids=repr,
)
def test_compress_bad_sparsity(sparsity, error):
    with pytest.raises(error, match="sparsity"):
        mustafar.compress(randn((1, 1, 3, 64), seed=23), sparsity)
    with pytest.raises(error, match="sparsity"):
        BitmapKV.empty(1, 1, 64, sparsity)


def test_compress_and_empty_bad_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        mustafar.compress(randn((1, 1, 3, 257), seed=24), 0.5)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        mustafar.compress(randn((1, 3, 64), seed=25), 0.5)
    with pytest.raises(TypeError, match="x must have dtype"):
        mustafar.compress(randn((1, 1, 3, 64), seed=26).double(), 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        BitmapKV.empty(1, 1, 300, 0.5)
    with pytest.raises(ValueError, match="batch"):
        BitmapKV.empty(0, 1, 64, 0.5)
    with pytest.raises(TypeError, match="kv_heads"):
        BitmapKV.empty(1, 2.0, 64, 0.5)
    with pytest.raises(ValueError, match="capacity"):
        BitmapKV.empty(1, 1, 64, 0.5, capacity=-1)


def test_constructor_checks():
    kv = mustafar.compress(randn((1, 2, 5, 80), seed=27), 0.5)
    assert BitmapKV(kv.values, kv.bitmaps, 80, 0.5).tokens == 5
    with pytest.raises(ValueError, match="values"):
        BitmapKV(kv.values, kv.bitmaps, 80, 0.7)
    with pytest.raises(ValueError, match="bitmaps"):
        BitmapKV(kv.values, kv.bitmaps[..., :1], 80, 0.5)
    with pytest.raises(TypeError, match="bitmaps"):
        BitmapKV(kv.values, kv.bitmaps.float(), 80, 0.5)


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
    store, _ = random_stores()
    for bad, error in ((torch.tensor([True, False]), TypeError), ([0], TypeError), (torch.tensor([[0]]), TypeError),
                       (torch.tensor([1]), ValueError), (torch.tensor([-1]), ValueError),
                       (torch.tensor([], dtype=torch.long), ValueError)):
        with pytest.raises(error, match="index"):
            store.select_batch(bad)


def test_truncate_keeps_python_ints():
    store, _ = random_stores()
    store.truncate(np.int64(5))
    assert type(store.tokens) is int and store.tokens == 5


def test_sizes_validate_their_arguments():
    with pytest.raises(ValueError, match="size"):
        mustafar.keep_count(-1, 0.5)
    with pytest.raises(TypeError, match="size"):
        mustafar.keep_count(5.5, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        mustafar.bytes_per_token(300, 0.7)
    with pytest.raises(TypeError, match="dtype"):
        mustafar.bytes_per_token(64, 0.7, torch.int8)


@PROPERTY_SETTINGS
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(0, 33), d=st.integers(1, 256), sparsity=SPARSITY_ST,
       dtype=DTYPE_ST, seed=st.integers(0, 2**16))
def test_format_round_trips(b, h, t, d, sparsity, dtype, seed):
    x = randn((b, h, t, d), seed, dtype)
    store = compress(x, sparsity)
    k = keep_count(d, sparsity)
    assert store.values.shape == (b, h, t, k) and store.bitmaps.shape == (b, h, t, -(-d // 64))
    assert bool(unpack_bitmaps(store.bitmaps, d).sum(-1).eq(k).all())
    assert torch.equal(store.decompress(), prune_per_token(x, sparsity))


@PROPERTY_SETTINGS
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8), d=st.sampled_from([1, 64, 80, 96, 128, 200, 256]),
       sparsity=SPARSITY_ST, dtype=DTYPE_ST, seed=st.integers(0, 2**16))
def test_appends_in_any_chunking_equal_one_compression(sizes, d, sparsity, dtype, seed):
    x = randn((2, 2, sum(sizes), d), seed, dtype)
    store = BitmapKV.empty(2, 2, d, sparsity, dtype=dtype)
    start = 0
    for n in sizes:
        store.append(x[:, :, start:start + n])
        start += n
    whole = compress(x, sparsity)
    assert store.tokens == whole.tokens == x.shape[2] and store.capacity >= store.tokens
    assert torch.equal(store.values, whole.values) and torch.equal(store.bitmaps, whole.bitmaps)
