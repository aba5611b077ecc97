"""Edge cases of the capped store growth (``BitmapKV.reserve``), the fused FP8 bookkeeping of the static cache, and
the Triton decode's long steps in pieces: odd shapes and inputs against the references (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch
from helpers import CACHE, tiny_model

import mustafar
from mustafar import MustafarCache, compress, prune_per_token
from mustafar.backends import triton_available
from mustafar.format import CAPACITY_GRANULE, GROWTH, GROWTH_MAX_TOKENS, BitmapKV
from mustafar.ops import append, sparse_decode_attention

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton (a GPU or TRITON_INTERPRET=1)")


def _expected(x: torch.Tensor, sparsity: float, kept_dtype) -> torch.Tensor:
    """What a store of ``x`` decompresses to: the pruned rows (FP8: quantised per token, as compress() does)."""
    if kept_dtype is None:
        return prune_per_token(x, sparsity)
    return compress(x, sparsity, kept_dtype=kept_dtype, backend="torch").decompress()


# ------------------------------------------------------------------ growth of the store
def test_one_token_appends_to_40k_keep_slack_and_reallocations_bounded():
    """Capacity >= tokens, on the granule, slack under 1024 tokens and 25 % (+ a granule), FP8 scales growing with the
    values, and few reallocations (geometric, then one per 1024 tokens) for 40000 one-token appends."""
    store = BitmapKV.empty(1, 1, 8, 0.5, dtype=torch.float16, kept_dtype=FP8)
    capacities = []
    for tokens in range(1, 40001):
        store.reserve(tokens)
        store.advance(1)
        if not capacities or capacities[-1] != store.capacity:
            capacities.append(store.capacity)
            slack = store.capacity - store.tokens
            assert store.capacity % CAPACITY_GRANULE == 0 and 0 <= slack < GROWTH_MAX_TOKENS
            assert slack <= (GROWTH - 1) * store.tokens + CAPACITY_GRANULE
            assert store.scale_storage.shape[2] == store.capacity == store.storage[1].shape[2]
    geometric = sum(1 for a, b in zip(capacities, capacities[1:]) if b - a < GROWTH_MAX_TOKENS)
    assert capacities[-1] - 40000 < GROWTH_MAX_TOKENS
    assert geometric <= 25 and len(capacities) - geometric <= -(-40000 // GROWTH_MAX_TOKENS)
    assert store.allocated_nbytes <= store.nbytes * GROWTH and store.allocated_nbytes - store.nbytes <= \
        GROWTH_MAX_TOKENS * mustafar.bytes_per_token(8, 0.5, torch.float16, FP8)


@pytest.mark.parametrize("kept_dtype", [None, FP8])
@pytest.mark.parametrize("head_dim,dtype,sparsity", [(1, torch.float32, 0.0), (7, torch.bfloat16, 0.9),
                                                     (80, torch.float16, 0.5), (256, torch.float32, 0.7)])
def test_contents_after_growth_with_odd_appends_rows_and_crops(head_dim, dtype, sparsity, kept_dtype):
    """Appends of 0, 1 and many tokens (both append paths), batch rows selected and repeated, a crop: the store
    decompresses to the pruned rows at every stage, whatever the growths in between."""
    gen = torch.Generator().manual_seed(head_dim)
    rows = lambda b, n: torch.randn(b, 3, n, head_dim, generator=gen).to(dtype)  # noqa: E731
    store = BitmapKV.empty(2, 3, head_dim, sparsity, dtype=dtype, kept_dtype=kept_dtype)
    held = rows(2, 0)
    for i, n in enumerate([0, 1, 0, 17, 1, 1, 40, 0, 3]):
        x = rows(2, n)
        store.append(x) if i % 2 else append(store, x, backend="torch")
        held = torch.cat([held, x], 2)
    assert torch.equal(store.decompress(), _expected(held, sparsity, kept_dtype))
    index = torch.tensor([1, 1, 0])
    store.select_batch(index)
    held = held[index]
    for _ in range(20):  # past the capacity, one token at a time
        x = rows(3, 1)
        append(store, x, backend="torch")
        held = torch.cat([held, x], 2)
    store.truncate(11)
    x = rows(3, 300)  # one append larger than a growth step
    append(store, x, backend="torch")
    held = torch.cat([held[:, :, :11], x], 2)
    assert store.capacity == -(-311 // CAPACITY_GRANULE) * CAPACITY_GRANULE
    assert torch.equal(store.decompress(), _expected(held, sparsity, kept_dtype))


def test_a_first_tokens_view_survives_the_growth_of_its_store():
    store = compress(torch.randn(2, 2, 20, 64), 0.5, kept_dtype=FP8)
    view = store.first_tokens(7)
    before = view.decompress().clone()
    append(store, torch.randn(2, 2, 2000, 64), backend="torch")  # reallocates: the view keeps the old buffers
    assert torch.equal(view.decompress(), before) and view.tokens == 7


@pytest.mark.parametrize("kept_dtype,dtype", [(None, torch.float16), (FP8, torch.bfloat16)])
def test_growth_is_invisible_to_a_decoding_model(kept_dtype, dtype):
    """A tiny model decoding 300 tokens one at a time (chunk 1: the store grows 9 times) gives bit for bit the logits
    of the same cache whose stores were reserved up front."""
    model = tiny_model(dtype=dtype)
    ids = torch.randint(128, (1, 300), generator=torch.Generator().manual_seed(3))

    def run(reserve: int):
        cache = MustafarCache(0.5, 0.7, window=3, chunk=1, kept_dtype=kept_dtype, backend="torch")
        with torch.inference_mode():
            logits = [model(ids[:, :5], **{CACHE: cache}).logits[:, -1:]]
            for layer in cache.layers:
                layer.key_store.reserve(reserve)
                layer.value_store.reserve(reserve)
            logits += [model(ids[:, i:i + 1], **{CACHE: cache}).logits for i in range(5, ids.shape[1])]
        return torch.cat(logits, 1), cache

    grown, cache = run(0)
    reserved, _ = run(512)
    assert cache.layers[0].key_store.capacity < 512
    assert torch.equal(grown, reserved)


# ------------------------------------------------------------------ fused FP8 bookkeeping (static cache)
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(_INT_OF_SIZE[t.element_size()])


@needs_triton
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,head_dim,window,sparsities,prompt", [
    (torch.float16, 3, 6, 2, 10, 1, (0.0, 0.9), 1),  # GQA 3, one-slot ring, prefill of one token
    (torch.bfloat16, 1, 2, 2, 16, 3, (0.7, 0.5), 4),
    (torch.float32, 3, 3, 1, 6, 2, (0.5, 0.5), 2),
])
def test_static_fp8_decode_fused_or_not_gives_the_same_bits(monkeypatch, dtype, batch, heads, kv_heads, head_dim,
                                                            window, sparsities, prompt):
    """``StaticMustafarCache(kept_dtype=FP8, backend="triton")`` decoding a tiny model to ``max_tokens``:
    ``MUSTAFAR_FUSED_BOOKKEEPING`` 1 or 0 gives identical logits, rings, stores (e4m3 bits, scales, bitmaps)."""
    from mustafar.cache.static import FUSED_ENV
    from mustafar.generation import cache_kwargs

    steps = 7
    ids = torch.randint(128, (batch, prompt + steps), generator=torch.Generator().manual_seed(7))
    runs = []
    for fused in (False, True):
        monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")
        model = tiny_model(dtype=dtype, hidden_size=heads * head_dim, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, head_dim=head_dim, seed=7)
        cache = mustafar.StaticMustafarCache(model.config, batch_size=batch, max_tokens=prompt + steps,
                                             key_sparsity=sparsities[0], value_sparsity=sparsities[1], window=window,
                                             backend="triton", kept_dtype=FP8)
        with torch.no_grad():
            logits = [model(ids[:, :prompt], **cache_kwargs(model, cache),
                            position_ids=torch.arange(prompt)[None]).logits]
            for i in range(prompt, prompt + steps):
                logits.append(model(ids[:, i:i + 1], **cache_kwargs(model, cache),
                                    position_ids=torch.tensor([[i]])).logits)
        assert all(layer.fused == fused for layer in cache.layers)
        state = [t for layer in cache.layers for store in (layer.key_store, layer.value_store)
                 for t in (*store.storage, store.scale_storage)] + \
                [t for layer in cache.layers for t in (layer.keys, layer.values, layer.length)]
        runs.append((logits, state))
    (logits_a, state_a), (logits_b, state_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(logits_a, logits_b))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(state_a, state_b))


# ------------------------------------------------------------------ Triton decode in pieces
@needs_triton
@pytest.mark.parametrize("group,q_len,tokens,window,head_dim,dtype,kept_dtype", [
    (1, 7, 0, 9, 7, torch.float32, None),  # one launch (7 rows)
    (1, 9, 0, 9, 7, torch.float32, FP8),  # two pieces, empty store, all in the window
    (3, 3, 5, 1, 16, torch.float16, None),  # 9 rows: pieces of 2 queries
    (7, 4, 6, 0, 16, torch.bfloat16, FP8),  # group above MAX_ROWS / 2: one query per piece, no window
    (3, 5, 3, 2, 1, torch.float32, None),  # queries reach back into the store: first pieces cut it
])
def test_triton_decode_in_pieces_at_the_row_limit(monkeypatch, group, q_len, tokens, window, head_dim, dtype,
                                                  kept_dtype):
    """Steps just below and above ``MAX_ROWS`` rows per KV head (8 here), empty stores, odd head_dims, masks of each
    kind, including one hiding every key from the first queries (zeros), against the reference."""
    import mustafar.launch.decode as launch_decode

    monkeypatch.setattr(launch_decode, "MAX_ROWS", 8)
    gen = torch.Generator().manual_seed(group * 100 + q_len)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    b, kv = 3, 2
    query = rand(b, kv * group, q_len, head_dim)
    keys = compress(rand(b, kv, tokens, head_dim), 0.5, kept_dtype=kept_dtype)
    values = compress(rand(b, kv, tokens, head_dim), 0.0, kept_dtype=kept_dtype)
    kw, vw = (rand(b, kv, window, head_dim), rand(b, kv, window, head_dim)) if window else (None, None)
    total = tokens + window
    hidden = torch.ones(1, 1, q_len, total, dtype=torch.bool)
    hidden[..., : total - q_len + 2] = False  # the first two queries see nothing
    masks = [None, hidden, torch.rand(b, 1, q_len, total, generator=gen) > 0.3,
             torch.where(torch.rand(b, kv * group, 1, total, generator=gen) > 0.3, 0.0, float("-inf")).to(dtype),
             torch.randn(1, 1, q_len, total, generator=gen).double()]
    for mask in masks:
        out = sparse_decode_attention(query, keys, values, kw, vw, backend="triton", attention_mask=mask)
        ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch", attention_mask=mask)
        assert out.shape == query.shape and not out.isnan().any()
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[dtype], (mask if mask is None else mask.dtype, err)
        if mask is hidden:
            assert not out[:, :, :2].any()


@pytest.mark.parametrize("kept_dtype", [None, FP8])
def test_appending_to_a_first_tokens_view_leaves_its_store_unchanged(kept_dtype):
    """A view shares its store's buffers until its first write, which copies its rows (copy on write)."""
    x, more = torch.randn(1, 2, 20, 64), torch.randn(1, 2, 3, 64)
    store = compress(x, 0.5, kept_dtype=kept_dtype)
    before = store.decompress().clone()
    view = store.first_tokens(10)
    view.append(more)
    assert torch.equal(store.decompress(), before) and store.tokens == 20
    assert view.tokens == 13 and view.capacity == 16
    assert torch.equal(view.decompress(), _expected(torch.cat([x[:, :, :10], more], dim=2), 0.5, kept_dtype))
    view.append(more)  # its own buffers now: grows as any store
    assert torch.equal(store.decompress(), before) and view.tokens == 16


def test_reserve_past_an_off_granule_capacity_stays_within_the_cap_plus_a_granule():
    """A store wrapping 5000 tokens (not a multiple of 16) grows by at most GROWTH_MAX_TOKENS, then rounds up."""
    store = compress(torch.randn(1, 1, 5000, 8), 0.5)
    store.reserve(5001)
    assert 5001 <= store.capacity <= 5000 + GROWTH_MAX_TOKENS + CAPACITY_GRANULE - 1
    assert store.capacity % CAPACITY_GRANULE == 0


def test_fused_is_false_before_a_static_layer_is_allocated():
    """Reading ``fused`` before the first update (no device, no buffers yet) answers False, any kept dtype."""
    from helpers import tiny_model as make_model

    config = make_model().config
    for kept_dtype in (None, FP8):
        for backend in ("auto", "torch", "triton"):
            cache = mustafar.StaticMustafarCache(config, max_tokens=16, window=4, kept_dtype=kept_dtype,
                                                 backend=backend)
            assert cache.layers[0].fused is False
