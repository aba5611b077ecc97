"""StaticMustafarCache and the graph-capturable static ops on the CPU (reference backend)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import CACHE, left_pad, prompt, states, tiny_model

import mustafar
from mustafar import StaticMustafarCache
from mustafar.cache.static_ops import static_decode_attention, static_evict
from mustafar.format import BitmapKV


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar").eval()


def _static_greedy(model, cfg, prompt, new_tokens, **kwargs):
    cache = mustafar.StaticMustafarCache(cfg, prompt.shape[0], prompt.shape[1] + new_tokens, dtype=torch.float32,
                                         device="cpu", **kwargs)
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, position_ids=torch.arange(prompt.shape[1])[None]).logits
        tokens = [logits[:, -1:].argmax(-1)]
        for i in range(new_tokens - 1):
            position = torch.tensor([[prompt.shape[1] + i]])
            tokens.append(model(tokens[-1], past_key_values=cache, position_ids=position).logits[:, -1:].argmax(-1))
    return torch.cat(tokens, 1), cache


@pytest.mark.parametrize("sparsity", [(0.0, 0.0), (0.5, 0.7)])
@pytest.mark.parametrize("prompt_len", [5, 8, 30])
def test_static_equals_dynamic_chunk_one(sparsity, prompt_len):
    """Same semantics as MustafarCache(window=w, chunk=1): identical greedy tokens and byte counts."""
    cfg, model = _model()
    prompt = torch.randint(128, (2, prompt_len))
    dynamic = mustafar.MustafarCache(*sparsity, window=8, chunk=1)
    expected = model.generate(prompt, past_key_values=dynamic, max_new_tokens=20, do_sample=False)[:, prompt_len:]
    tokens, cache = _static_greedy(model, cfg, prompt, 20, key_sparsity=sparsity[0], value_sparsity=sparsity[1],
                                   window=8)
    assert torch.equal(tokens, expected)
    assert cache.get_seq_length() == prompt_len + 19
    assert int(cache.layers[0].length) == prompt_len + 19


def test_static_nbytes_formula():
    cfg, model = _model()
    tokens, cache = _static_greedy(model, cfg, torch.randint(128, (1, 40)), 10, key_sparsity=0.7,
                                   value_sparsity=0.5, window=8)
    held = 49
    kv_heads = 2
    per_layer = kv_heads * ((held - 8) * (mustafar.bytes_per_token(16, 0.7, torch.float32)
                                          + mustafar.bytes_per_token(16, 0.5, torch.float32))
                            + 2 * 8 * mustafar.dense_bytes_per_token(16, torch.float32))
    assert cache.nbytes == 2 * per_layer  # two layers
    assert cache.allocated_nbytes >= cache.nbytes


def test_static_ops_read_counts_from_device_tensor():
    """Attention with length n equals the dynamic attention over the first n tokens."""
    torch.manual_seed(1)
    w, cap = 4, 32
    ring = torch.randn(1, 2, w, 16)
    stores = [BitmapKV.empty(1, 2, 16, 0.5, torch.float32, "cpu", capacity=cap) for _ in range(2)]
    for store in stores:
        store.append(torch.randn(1, 2, cap, 16))
    query = torch.randn(1, 4, 1, 16)
    for n in (1, 3, 4, 9, 20):
        out = static_decode_attention(query, *stores, ring, ring * 2, torch.tensor(n), backend="torch")
        n_comp, n_win = max(0, n - w), min(n, w)
        key_view = BitmapKV(stores[0].values[:, :, :n_comp], stores[0].bitmaps[:, :, :n_comp], 16, 0.5)
        value_view = BitmapKV(stores[1].values[:, :, :n_comp], stores[1].bitmaps[:, :, :n_comp], 16, 0.5)
        ref = mustafar.sparse_decode_attention(query, key_view, value_view, ring[:, :, :n_win],
                                               (ring * 2)[:, :, :n_win], backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_static_evict_moves_the_overwritten_token():
    torch.manual_seed(2)
    ring = torch.randn(1, 1, 4, 8)
    store = BitmapKV.empty(1, 1, 8, 0.5, torch.float32, "cpu", capacity=16)
    for n in range(8):
        before = store.storage[0].clone()
        static_evict(ring, store, torch.tensor(n), backend="torch")
        if n < 4:
            assert torch.equal(store.storage[0], before)
        else:
            expected = mustafar.compress(ring[:, :, n % 4 : n % 4 + 1], 0.5)
            assert torch.equal(store.storage[0][:, :, n - 4], expected.values[:, :, 0])
            assert torch.equal(store.storage[1][:, :, n - 4], expected.bitmaps[:, :, 0])


def test_static_bad_inputs():
    cfg, model = _model()
    with pytest.raises(ValueError, match="window"):
        mustafar.StaticMustafarCache(cfg, 1, 10, window=0)
    with pytest.raises(ValueError, match="max_tokens"):
        mustafar.StaticMustafarCache(cfg, 1, 0)
    with pytest.raises(ValueError, match="key_sparsity"):
        mustafar.StaticMustafarCache(cfg, 1, 10, key_sparsity=1.0)
    cache = mustafar.StaticMustafarCache(cfg, 1, 12, window=4, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(torch.randint(128, (1, 10)), past_key_values=cache, cache_position=torch.arange(10))
        with pytest.raises(ValueError, match="prefill"):
            model(torch.randint(128, (1, 2)), past_key_values=cache, cache_position=torch.arange(10, 12))
        with pytest.raises(ValueError, match="max_tokens"):
            model(torch.randint(128, (1, 5)), past_key_values=mustafar.StaticMustafarCache(
                cfg, 1, 4, window=2, dtype=torch.float32, device="cpu"), cache_position=torch.arange(5))


def test_static_cache_with_sdpa_raises():
    cfg, model = _model()
    model.set_attn_implementation("sdpa")
    cache = mustafar.StaticMustafarCache(cfg, 1, 20, window=4, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(torch.randint(128, (1, 6)), past_key_values=cache, cache_position=torch.arange(6))
        with pytest.raises(ValueError, match="mustafar"):
            model(torch.randint(128, (1, 1)), past_key_values=cache, cache_position=torch.tensor([6]))


# ---------------------------------------------------------------- lazy allocation (issue 6)
def test_static_allocates_nothing_before_the_prefill():
    cfg, model = _model()
    cache = mustafar.StaticMustafarCache(cfg, max_tokens=64, window=8)
    assert len(cache.layers) == 2 and cache.allocated_nbytes == cache.nbytes == cache.dense_nbytes == 0
    assert all(layer.keys is None and layer.key_store is None and layer.length is None for layer in cache.layers)
    cache.reset()  # nothing to reset yet
    prompt = torch.randint(128, (3, 30))
    with torch.no_grad():
        model(prompt, past_key_values=cache, position_ids=torch.arange(30)[None])
    assert cache.layers[0].keys.shape == (3, 2, 8, 16) and cache.layers[0].key_store.capacity >= 64 - 8
    assert cache.allocated_nbytes >= cache.nbytes > 0


def test_static_without_config_creates_layers_at_their_first_update():
    cfg, model = _model()
    prompt = torch.randint(128, (2, 12))
    with_config, _ = _static_greedy(model, cfg, prompt, 6, window=4)
    cache = mustafar.StaticMustafarCache(max_tokens=18, window=4)
    assert len(cache.layers) == 0 and cache.allocated_nbytes == 0
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, position_ids=torch.arange(12)[None]).logits
    assert len(cache.layers) == 2 and cache.layers[1].keys.dtype == torch.float32
    assert torch.equal(logits[:, -1:].argmax(-1), with_config[:, :1])


def test_static_checks_the_given_batch_dtype_and_device():
    k = torch.randn(2, 2, 5, 16)
    for kwargs, match in [(dict(batch_size=3), r"\[3, 2, n, 16\]"), (dict(dtype=torch.float16), "float16"),
                          (dict(device="meta"), "meta device")]:
        cache = mustafar.StaticMustafarCache(max_tokens=10, window=2, **kwargs)
        with pytest.raises(ValueError, match=match):
            cache.update(k, k.clone(), 0)
        assert cache.allocated_nbytes == 0
    with pytest.raises(ValueError, match="value_states"):
        mustafar.StaticMustafarCache(max_tokens=10).update(k, k[:, :1].clone(), 0)
    with pytest.raises(TypeError, match="max_tokens"):
        mustafar.StaticMustafarCache()
    with pytest.raises(TypeError, match="dtype"):
        mustafar.StaticMustafarCache(max_tokens=10, dtype=torch.int8)
    with pytest.raises(ValueError, match="backend"):
        mustafar.StaticMustafarCache(max_tokens=10, backend="gpu")


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records host-syncing ops and the largest new tensor any op creates (in-place results do not count)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.syncs, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.SYNCING:
            self.syncs.append(str(func))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        new = [t for t in torch.utils._pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.largest = max([self.largest] + [t.numel() for t in new])
        return out


@pytest.mark.parametrize("max_tokens", [64, 4096])
def test_static_decode_update_is_sync_free_and_allocates_o1(max_tokens):
    """After the lazy prefill, a decode update syncs nothing and creates no tensor that grows with the context."""
    cache = mustafar.StaticMustafarCache(max_tokens=max_tokens, window=8, backend="torch")
    k = torch.randn(2, 3, 40, 16)
    cache.update(k, k.clone(), 0)
    cache.layers[0].consume()
    step = torch.randn(2, 3, 1, 16)
    with _Recorder() as recorder:
        cache.update(step, step.clone(), 0)
    assert recorder.syncs == []
    assert recorder.largest <= 2 * 3 * 8 * 16  # at most a ring's size, whatever max_tokens is


def test_static_cache_cannot_crop():
    cache = StaticMustafarCache(max_tokens=16, window=4)
    assert cache.is_croppable is False  # before any layer exists too (transformers' assisted decoding reads it)
    cache.update(*states(tokens=6), 0)
    cache.layers[0].consume()
    assert cache.is_croppable is False and cache.layers[0].is_croppable is False
    for crop in (cache.crop, cache.layers[0].crop):
        with pytest.raises(NotImplementedError, match="StaticMustafarCache cannot crop.*use MustafarCache"):
            crop(-1)
    assert cache.get_seq_length() == 6


def test_static_cache_refuses_batch_row_edits():
    """Was: reorder_cache reordered the dense ring but not the store (a silent wrong answer)."""
    cache = StaticMustafarCache(max_tokens=16, window=2)
    cache.update(*states(tokens=6), 0)
    cache.layers[0].consume()
    ring = cache.layers[0].keys.clone()
    for edit, arg in ((cache.reorder_cache, torch.tensor([2, 1, 0])), (cache.batch_select_indices, torch.tensor([0])),
                      (cache.batch_repeat_interleave, 2)):
        with pytest.raises(NotImplementedError, match="StaticMustafarCache cannot reorder, select or repeat batch"):
            edit(arg)
    assert torch.equal(cache.layers[0].keys, ring)
    empty = StaticMustafarCache(max_tokens=16, window=2)  # no config, no layers yet: refused all the same
    with pytest.raises(NotImplementedError, match="StaticMustafarCache cannot reorder"):
        empty.batch_repeat_interleave(2)


def test_static_cache_refuses_padding():
    model = tiny_model(seed=1)
    ids, mask = left_pad([prompt(10)[0], prompt(6)[0]])
    cache = StaticMustafarCache(model.config, batch_size=2, max_tokens=32, window=4, device="cpu")
    match = "StaticMustafarCache does not support padded batches"
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        model(ids, attention_mask=mask, cache_position=torch.arange(10), **{CACHE: cache})
