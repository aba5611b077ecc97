"""Pruning rules against brute-force oracles written independently of the implementation.

Rules: per-token magnitude pruning (Mustafar, arXiv 2505.22913), output-aware,
per-channel and ThinK (Xu et al. 2024, arXiv 2407.21018).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import randn
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar
from mustafar.pruning import RULES, get_rule, keep_count, per_token_mask

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (1, 7, 64, 80, 96, 128, 256)
#: Magnitudes drawn for tie-heavy data: repeated values, +0/-0, equal |x| with both signs.
TIE_POOL = (-3.0, -2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 3.0)



def tie_data(shape, seed, dtype=torch.float32):
    """Seeded data from :data:`TIE_POOL`, so that most rows hold ties."""
    index = torch.randint(len(TIE_POOL), shape, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(TIE_POOL, dtype=dtype)[index]


def oracle_keep(row: list[float], k: int) -> set[int]:
    """Channels kept by per-token pruning of one row: sort by (-|x|, index), take ``k``."""
    return set(sorted(range(len(row)), key=lambda i: (-abs(row[i]), i))[:k])


def oracle_k_keep(head_dim: int, sparsity: float) -> int:
    """``head_dim - floor(sparsity * head_dim)`` for sparsities whose product is exact."""
    return head_dim - math.floor(sparsity * head_dim)


def oracle_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token keep-mask of ``x [..., d]`` row by row in pure Python."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    mask = [[i in oracle_keep(row, k) for i in range(len(row))] for row in rows]
    return torch.tensor(mask, dtype=torch.bool).reshape(x.shape)


# ------------------------------------------------------------------ keep_count
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("sparsity", [0.0, 0.125, 0.25, 0.5, 0.75, 0.875])
def test_keep_count_formula_on_exact_products(head_dim, sparsity):
    assert keep_count(head_dim, sparsity) == oracle_k_keep(head_dim, sparsity)


@pytest.mark.parametrize(
    ("size", "sparsity", "expected"),
    [(128, 0.7, 39), (64, 0.7, 20), (10, 0.7, 3), (100, 0.29, 71), (80, 0.3, 56), (96, 0.9, 10), (7, 0.5, 4)],
)
def test_keep_count_decimal_sparsities(size, sparsity, expected):
    # 0.7 * 10 and 0.29 * 100 are not exact in binary; the decimal is meant.
    assert keep_count(size, sparsity) == expected


@settings(deadline=None)
@given(head_dim=st.integers(1, 256), digits=st.integers(0, 999_999))
def test_keep_count_matches_integer_arithmetic_for_decimals(head_dim, digits):
    sparsity = float(f"0.{digits:06d}")
    assert keep_count(head_dim, sparsity) == head_dim - (digits * head_dim) // 10**6


@settings(deadline=None)
@given(head_dim=st.integers(1, 256), sparsity=st.floats(0.0, 1.0, exclude_max=True))
def test_keep_count_keeps_at_least_one_and_at_most_all(head_dim, sparsity):
    k = keep_count(head_dim, sparsity)
    assert 1 <= k <= head_dim
    assert abs(k - (head_dim - sparsity * head_dim)) < 1 + 1e-6


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_keep_count_one_entry_left(head_dim):
    assert keep_count(head_dim, (head_dim - 1) / head_dim) == 1
    assert keep_count(head_dim, 1 - 1e-12) == 1  # rounding must never leave a row empty


# ------------------------------------------------------------- per-token rule
@settings(max_examples=150, deadline=None)
@given(
    head_dim=st.integers(1, 20),
    tokens=st.integers(1, 6),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    removed=st.integers(0, 19),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_token_matches_bruteforce_oracle_with_ties(head_dim, tokens, batch, kv_heads, removed, dtype, seed):
    removed = min(removed, head_dim - 1)
    sparsity, k = removed / head_dim, head_dim - removed
    x = tie_data((batch, kv_heads, tokens, head_dim), seed, dtype)
    expected = oracle_mask(x, k)
    assert torch.equal(per_token_mask(x, sparsity), expected)
    assert torch.equal(mustafar.prune_per_token(x, sparsity), torch.where(expected, x, torch.zeros((), dtype=dtype)))


@settings(max_examples=40, deadline=None)
@given(head_dim=st.integers(1, 40), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**31 - 1))
def test_per_token_oracle_random_data_any_sparsity(head_dim, sparsity, seed):
    x = randn((2, 2, 5, head_dim), seed)
    assert torch.equal(per_token_mask(x, sparsity), oracle_mask(x, keep_count(head_dim, sparsity)))


@pytest.mark.parametrize(
    ("row", "sparsity", "kept"),
    [
        ([1.0, -1.0, 1.0, -1.0], 0.5, {0, 1}),  # equal |x|, different signs: lower channels
        ([-1.0, 1.0, -1.0, 1.0], 0.75, {0}),
        ([0.0, -0.0, 0.0, -0.0], 0.75, {0}),  # +0 and -0 tie
        ([-0.0, 0.0, 5.0, 0.0], 0.5, {0, 2}),
        ([-2.0, 2.0, -2.0, 1.0], 0.5, {0, 1}),
        ([1.0, 2.0, 3.0, 3.0], 0.75, {2}),
        ([1.0, 3.0, 3.0, 3.0, -3.0, 3.0], 0.5, {1, 2, 3}),
        ([0.5, 0.25, -0.5, -0.25, 0.5], 0.4, {0, 2, 4}),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_hand_ties(row, sparsity, kept, dtype):
    x = torch.tensor(row, dtype=dtype).reshape(1, 1, 1, -1)
    mask = per_token_mask(x, sparsity)[0, 0, 0]
    assert {i for i, keep in enumerate(mask.tolist()) if keep} == kept
    assert oracle_keep(row, len(kept)) == kept


def test_per_token_nan_counts_as_largest():
    x = torch.tensor([1.0, float("nan"), 2.0, 3.0]).reshape(1, 1, 1, 4)
    assert per_token_mask(x, 0.5)[0, 0, 0].tolist() == [False, True, False, True]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_counts_and_values(head_dim, dtype):
    x = randn((3, 2, 65, head_dim), seed=head_dim * 7 + DTYPES.index(dtype), dtype=dtype)
    for sparsity in (0.0, 0.5, 0.7, (head_dim - 1) / head_dim):
        k = keep_count(head_dim, sparsity)
        y = mustafar.prune_per_token(x, sparsity)
        mask = per_token_mask(x, sparsity)
        assert y.dtype == dtype and y.shape == x.shape
        assert bool((mask.sum(-1) == k).all())
        assert torch.equal(y[mask], x[mask]) and bool((y[~mask] == 0).all())
        # every kept magnitude is at least every pruned magnitude of the same token
        smallest_kept = torch.where(mask, x.abs().float(), torch.inf).amin(-1)
        largest_dropped = torch.where(mask, -torch.inf, x.abs().float()).amax(-1)
        assert bool((smallest_kept >= largest_dropped).all())
    assert torch.equal(mustafar.prune_per_token(x, 0.0), x)


def test_per_token_non_contiguous_input():
    base = randn((2, 40, 3, 64), seed=11)
    x = base.transpose(1, 2)  # [2, 3, 40, 64], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(mustafar.prune_per_token(x, 0.7), mustafar.prune_per_token(x.contiguous(), 0.7))
    strided = randn((1, 2, 10, 128), seed=12)[..., ::2]
    assert torch.equal(mustafar.prune_per_token(strided, 0.5), mustafar.prune_per_token(strided.contiguous(), 0.5))


# -------------------------------------------------------------- output-aware
def test_output_aware_hand_example():
    keys = torch.tensor([4.0, -3.0, 2.0, 1.0]).reshape(1, 1, 1, 4)
    queries = torch.tensor([[0.1, 1.0, 1.0, 10.0], [-0.1, -1.0, 1.0, -10.0]]).reshape(1, 1, 2, 4)
    # mean |q| = [0.1, 1, 1, 10] -> scores [0.4, 3, 2, 10]: keep channels 1 and 3
    out = mustafar.prune_output_aware(keys, 0.5, queries)
    assert out.flatten().tolist() == [0.0, -3.0, 0.0, 1.0]
    assert mustafar.prune_per_token(keys, 0.5).flatten().tolist() == [4.0, -3.0, 0.0, 0.0]


@pytest.mark.parametrize(("kv_heads", "group", "q_len"), [(1, 1, 4), (2, 2, 2), (2, 4, 1), (1, 8, 2)])
def test_output_aware_matches_oracle_per_gqa_group(kv_heads, group, q_len):
    seed = kv_heads * 100 + group * 10 + q_len
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-8, 9, (2, kv_heads, 6, 12), generator=g).float()
    queries = torch.randint(-8, 9, (2, kv_heads * group, q_len, 12), generator=g).float()
    k = keep_count(12, 0.5)
    mask = RULES["output-aware"].mask(keys, 0.5, queries)
    for b in range(2):
        for h in range(kv_heads):
            rows = queries[b, h * group : (h + 1) * group].reshape(-1, 12).tolist()
            weight = [sum(abs(r[c]) for r in rows) / len(rows) for c in range(12)]  # exact: len is a power of 2
            for t in range(6):
                scores = [abs(keys[b, h, t, c].item()) * weight[c] for c in range(12)]
                kept = set(sorted(range(12), key=lambda c: (-scores[c], c))[:k])
                assert {c for c in range(12) if mask[b, h, t, c]} == kept
    assert bool((mask.sum(-1) == k).all())
    out = mustafar.prune_output_aware(keys.half(), 0.5, queries)
    assert out.shape == keys.shape and out.dtype == torch.float16


# ---------------------------------------------------------------- per-channel
def test_per_channel_hand_example():
    x = torch.tensor([[1.0, -5.0], [3.0, 2.0], [-2.0, 2.0], [0.5, -1.0]]).reshape(1, 1, 4, 2)
    out = mustafar.prune_per_channel(x, 0.5)
    assert out[0, 0].tolist() == [[0.0, -5.0], [3.0, 2.0], [-2.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_per_channel_counts_and_oracle(dtype, sparsity):
    x = tie_data((2, 3, 9, 16), seed=int(sparsity * 10) + 3 * DTYPES.index(dtype), dtype=dtype)
    mask = RULES["per-channel"].mask(x, sparsity)
    k = keep_count(9, sparsity)
    assert bool((mask.sum(-2) == k).all())
    expected = oracle_mask(x.transpose(-1, -2), k).transpose(-1, -2)
    assert torch.equal(mask, expected)
    assert torch.equal(mustafar.prune_per_channel(x, sparsity), torch.where(expected, x, torch.zeros((), dtype=dtype)))


# ----------------------------------------------------------------------- ThinK
def test_think_hand_example():
    keys = torch.tensor([[3.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 1.0]]).reshape(1, 1, 2, 4)
    queries = torch.tensor([1.0, 1.0, 0.0, 2.0]).reshape(1, 1, 1, 4)
    # ||K[:, c]|| = [5, 0, 1, 1], ||Q[:, c]|| = [1, 1, 0, 2] -> scores [5, 0, 0, 2]: keep channels 0 and 3
    out = mustafar.prune_think(keys, 0.5, queries)
    assert out[0, 0].tolist() == [[3.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize(("kv_heads", "group"), [(1, 1), (2, 3), (4, 2)])
def test_think_same_channels_for_every_token(kv_heads, group):
    seed = 10 * kv_heads + group
    keys = randn((2, kv_heads, 33, 64), seed)
    queries = randn((2, kv_heads * group, 5, 64), seed + 1)
    mask = RULES["think"].mask(keys, 0.7, queries)
    assert mask.shape == keys.shape
    assert bool((mask == mask[:, :, :1]).all())
    assert bool((mask.sum(-1) == keep_count(64, 0.7)).all())
    for b in range(2):
        for h in range(kv_heads):
            q = queries[b, h * group : (h + 1) * group].double().reshape(-1, 64)
            scores = (keys[b, h].double().pow(2).sum(0).sqrt() * q.pow(2).sum(0).sqrt()).tolist()
            kept = set(sorted(range(64), key=lambda c: (-scores[c], c))[: keep_count(64, 0.7)])
            assert {c for c in range(64) if mask[b, h, 0, c]} == kept


# -------------------------------------------------------------------- registry
def test_rule_registry():
    assert set(RULES) == {"per-token", "output-aware", "per-channel", "think"}
    assert {name for name, rule in RULES.items() if rule.storable} == {"per-token", "output-aware"}
    assert get_rule("per-token") is RULES["per-token"]
    with pytest.raises(ValueError, match="method"):
        get_rule("magnitude")


# ------------------------------------------------------------------- bad input
BAD_SPARSITIES = [
    (-0.1, ValueError),
    (1.0, ValueError),
    (1.5, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (True, TypeError),
    ("0.5", TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize(("sparsity", "error"), BAD_SPARSITIES, ids=repr)
def test_bad_sparsity(sparsity, error):
    x = randn((1, 1, 2, 8), seed=1)
    with pytest.raises(error, match="sparsity"):
        mustafar.prune_per_token(x, sparsity)
    with pytest.raises(error, match="sparsity"):
        keep_count(8, sparsity)
    with pytest.raises(error, match="sparsity"):
        mustafar.prune_per_channel(x, sparsity)


@pytest.mark.parametrize("head_dim", [0, 257, 512])
def test_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        mustafar.prune_per_token(randn((1, 1, 2, head_dim), seed=2), 0.5)


@pytest.mark.parametrize("shape", [(2, 8), (1, 2, 8), (1, 1, 1, 2, 8)])
def test_bad_rank(shape):
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        mustafar.prune_per_token(randn(shape, seed=3), 0.5)


def test_bad_tensor_type_and_dtype():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mustafar.prune_per_token([[[[1.0, 2.0]]]], 0.5)
    with pytest.raises(TypeError, match="x must have dtype"):
        mustafar.prune_per_token(torch.randint(0, 5, (1, 1, 2, 8)), 0.5)
    with pytest.raises(TypeError, match="x must have dtype"):
        mustafar.prune_per_token(randn((1, 1, 2, 8), seed=4).double(), 0.5)


def test_bad_queries():
    keys = randn((1, 2, 4, 8), seed=5)
    with pytest.raises(ValueError, match="queries"):
        mustafar.prune_output_aware(keys, 0.5, None)
    with pytest.raises(ValueError, match="queries"):
        mustafar.prune_output_aware(keys, 0.5, randn((1, 3, 1, 8), seed=6))  # 3 heads, 2 kv_heads
    with pytest.raises(ValueError, match="queries"):
        mustafar.prune_think(keys, 0.5, randn((1, 2, 1, 16), seed=7))
    with pytest.raises(ValueError, match="queries"):
        mustafar.prune_think(keys, 0.5, randn((2, 2, 1, 8), seed=8))
    with pytest.raises(ValueError, match="queries must have 4 dimensions"):
        mustafar.prune_output_aware(keys, 0.5, randn((2, 1, 8), seed=9))


def test_output_aware_and_think_need_a_query():
    keys = torch.randn(1, 2, 3, 8)
    for prune in (mustafar.prune_output_aware, mustafar.prune_think):
        with pytest.raises(ValueError, match="q_len >= 1"):
            prune(keys, 0.5, torch.randn(1, 2, 0, 8))


def test_float32_sparsity_counts_as_its_decimal():
    assert mustafar.keep_count(80, np.float32(0.7)) == 24 == mustafar.keep_count(80, 0.7)
    assert mustafar.SparsityConfig(float(np.float32(0.7)), 0.5).name == "K0.7V0.5"
    assert mustafar.keep_count(17, 2 / 17) == 15  # a float64 fraction is not snapped
