"""Edge settings of MustafarCache against the oracle (issue 5): extreme sparsities, window/chunk boundaries, per layer.

Each case decodes greedily with a MustafarCache and with the oracle
(:class:`helpers.ReferenceCache`) and compares tokens and teacher-forced
logits; the cache's counts are checked against the rule.
"""

import pytest
import torch
from helpers import (
    BASE,
    CACHE,
    ReferenceCache,
    boundary,
    forced_logits,
    generate,
    prompt,
    tiny_model,
)
from transformers import DynamicCache

from mustafar import MustafarCache, keep_count

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
HEAD_DIM_64 = {**BASE, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}


def same_as_oracle(model, ids, new, **setting):
    cache = MustafarCache(**setting)
    out = generate(model, ids, cache, new)
    assert torch.equal(out, generate(model, ids, ReferenceCache(**setting), new))
    total = out.shape[1] - 1
    assert cache.get_seq_length() == total
    assert all(layer.stored_tokens == boundary(total, 0, setting["window"], setting["chunk"]) for layer in cache.layers)
    logits = forced_logits(model, MustafarCache(**setting), out, ids.shape[1])
    torch.testing.assert_close(logits, forced_logits(model, ReferenceCache(**setting), out, ids.shape[1]),
                               rtol=1e-4, atol=1e-4)
    return cache


def test_one_entry_per_token():
    """Sparsity 0.99 at head_dim 64 keeps k_keep = 1 entry of every K and V vector."""
    assert keep_count(64, 0.99) == 1
    model = tiny_model(seed=1, **HEAD_DIM_64)
    cache = same_as_oracle(model, prompt(30, seed=2), 20, key_sparsity=0.99, value_sparsity=0.99, window=4, chunk=8)
    store = cache.layers[0].key_store
    assert store.values.shape[-1] == 1 and bool((store.decompress() != 0).sum(-1).eq(1).all())


@pytest.mark.parametrize("length, window, chunk, new", [
    (5, 8, 16, 10),  # the prompt and the answer shorter than the window: nothing pruned
    (24, 8, 16, 12),  # exactly window + chunk at the prefill
    (23, 8, 16, 12),  # one short of it: the first move happens at the first decode step
    (25, 8, 16, 12),
    (13, 2, 3, 45),  # many chunk boundaries during decode
    (9, 0, 1, 30),  # window 0, chunk 1: every token pruned, the current one included
    (17, 5, 1, 25),  # chunk 1: one token moves per step
])
def test_window_and_chunk_boundaries(length, window, chunk, new):
    model = tiny_model(seed=3)
    same_as_oracle(model, prompt(length, seed=4), new, key_sparsity=0.6, value_sparsity=0.4, window=window,
                   chunk=chunk)


@pytest.mark.parametrize("kind", ["list", "callable"])
def test_per_layer_and_per_kv_sparsity(kind):
    pairs = [(0.25, 0.75), (0.9, 0.0), (0.0, 0.6)]
    model = tiny_model(seed=5, **{**BASE, "num_hidden_layers": 3})
    layer_sparsity = pairs if kind == "list" else (lambda i: pairs[i])
    cache = MustafarCache(window=4, chunk=6, layer_sparsity=layer_sparsity)
    ids = prompt(26, seed=6)
    out = generate(model, ids, cache, 20)
    oracle = ReferenceCache(window=4, chunk=6, layer_sparsity=lambda i: pairs[i])
    assert torch.equal(out, generate(model, ids, oracle, 20))
    assert [(layer.key_store.sparsity, layer.value_store.sparsity) for layer in cache.layers] == pairs
    assert [layer.key_store.k_keep for layer in cache.layers] == [12, 2, 16]  # head_dim 16


def test_sparsity_zero_store_is_the_dense_tokens():
    """At sparsity 0 the store holds every entry: decompressed, it is bit for bit the dense K and V."""
    model = tiny_model(seed=7)
    ids = prompt(40, seed=8)
    cache, reference = MustafarCache(0.0, 0.0, window=3, chunk=4), DynamicCache()
    with torch.inference_mode():
        model(ids, **{CACHE: cache})
        model(ids, **{CACHE: reference})
    for mine, theirs in zip(cache.layers, reference.layers):
        n = mine.stored_tokens
        assert n == 36 and torch.equal(mine.key_store.decompress(), theirs.keys[:, :, :n])
        assert torch.equal(mine.value_store.decompress(), theirs.values[:, :, :n])
        assert torch.equal(mine.values, theirs.values[:, :, n:])
