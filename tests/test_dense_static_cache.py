"""DenseStaticCache, the fair dense baseline of graph-mode decoding (issue 14), on the CPU."""

from __future__ import annotations

import pytest
import torch
import transformers

import mustafar
from mustafar.cache import DenseStaticLayer
from mustafar.bench.decode import graph_decode


def _model(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, intermediate_size=128, vocab_size=128)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar").eval()


def _greedy(model, cache, prompt, new_tokens, chunks=None):
    """Greedy tokens and the last logits, the prompt prefilled in ``chunks`` (sizes; None: one step)."""
    chunks, start = chunks or [prompt.shape[1]], 0
    tokens = []
    with torch.no_grad():
        for size in chunks:
            positions = torch.arange(start, start + size)[None]
            logits = model(prompt[:, start:start + size], past_key_values=cache, position_ids=positions).logits
            start += size
        for _ in range(new_tokens):
            tokens.append(logits[:, -1:].argmax(-1))
            logits = model(tokens[-1], past_key_values=cache, position_ids=torch.tensor([[start]])).logits
            start += 1
    return torch.cat(tokens, 1), logits


def _step(model, cache, position):
    """One decode step of a random token at ``position``; its logits."""
    with torch.no_grad():
        return model(torch.randint(128, (1, 1)), past_key_values=cache, position_ids=torch.tensor([[position]])).logits


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_same_greedy_tokens_as_dynamic_cache(kv_heads, batch):
    cfg, model = _model(kv_heads=kv_heads)
    prompt = torch.randint(128, (batch, 23))
    expected, expected_logits = _greedy(model, transformers.DynamicCache(), prompt, 12)
    cache = mustafar.DenseStaticCache(cfg, batch_size=batch, max_tokens=23 + 12)
    tokens, logits = _greedy(model, cache, prompt, 12)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 23 + 12 and int(cache.layers[0].length) == 23 + 12


@pytest.mark.parametrize("chunks", [[7, 9, 7], [1, 22], [22, 1], [5, 5, 5, 5, 3]])
def test_chunked_prefill_equals_one_step(chunks):
    cfg, model = _model()
    prompt = torch.randint(128, (2, 23))
    expected, expected_logits = _greedy(model, transformers.DynamicCache(), prompt, 8)
    tokens, logits = _greedy(model, mustafar.DenseStaticCache(cfg, 2, 31), prompt, 8, chunks)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


def test_graph_decode_equals_dynamic_cache():
    """The benchmark's decode loop (eager here) over the fair dense cache: transformers' greedy tokens."""
    cfg, model = _model()
    prompt = torch.randint(128, (2, 30))
    tokens, timings = graph_decode(model, mustafar.DenseStaticCache(cfg, 2, 30 + 9), prompt, 9, capture=False)
    expected, _ = _greedy(model, transformers.DynamicCache(), prompt, 9)
    assert torch.equal(tokens, expected) and timings.timed_steps == 6


def test_buffers_preallocated_and_written_in_place():
    cfg, model = _model()
    cache = mustafar.DenseStaticCache(cfg, 1, 40)
    assert cache.allocated_nbytes == 0
    _greedy(model, cache, torch.randint(128, (1, 10)), 3)
    layer = cache.layers[0]
    keys = layer.keys
    assert tuple(keys.shape) == (1, 2, 40, 16)
    assert cache.allocated_nbytes == 2 * 2 * keys.numel() * keys.element_size()
    assert torch.count_nonzero(keys[:, :, 13:]) == 0 and torch.count_nonzero(keys[:, :, 12]) > 0
    _step(model, cache, 13)
    _step(model, cache, 14)
    assert layer.keys is keys and int(layer.length) == 15


def test_decode_attention_reads_exactly_the_held_tokens():
    """attend() sees views of length L (no full-capacity mask), and garbage past L changes nothing."""
    cfg, model = _model()
    cache = mustafar.DenseStaticCache(cfg, 1, 64)
    prompt = torch.randint(128, (1, 12))
    _greedy(model, cache, prompt, 1)
    for layer in cache.layers:
        layer.keys[:, :, 13:] = 1e4
        layer.values[:, :, 13:] = float("nan")
    seen = []
    original = DenseStaticLayer.attend

    def spy(self, query, key, value, scale, mask):
        seen.append(key.shape[2])
        return original(self, query, key, value, scale, mask)

    DenseStaticLayer.attend = spy
    try:
        logits = _step(model, cache, 13)
    finally:
        DenseStaticLayer.attend = original
    assert seen == [14, 14] and torch.isfinite(logits).all()


def test_bad_inputs():
    cfg, model = _model()
    with pytest.raises(TypeError, match="max_tokens"):
        mustafar.DenseStaticCache(cfg, 1)
    with pytest.raises(ValueError, match="max_tokens"):
        mustafar.DenseStaticCache(cfg, 1, 0)
    with pytest.raises(TypeError, match="dtype"):
        mustafar.DenseStaticCache(cfg, 1, 8, dtype=torch.int8)
    cache = mustafar.DenseStaticCache(cfg, 2, 12)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[2, 2, n, 16\]"):
        model(torch.randint(128, (1, 4)), past_key_values=cache)
    cache = mustafar.DenseStaticCache(cfg, 1, 12)
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_tokens=12"):
            model(torch.randint(128, (1, 13)), past_key_values=cache)
        cache = mustafar.DenseStaticCache(cfg, 1, 12)
        _greedy(model, cache, torch.randint(128, (1, 6)), 2)
        with pytest.raises(ValueError, match="only before the first one-token"):
            model(torch.randint(128, (1, 2)), past_key_values=cache, position_ids=torch.tensor([[8, 9]]))
    for edit in (lambda: cache.crop(1), lambda: cache.reorder_cache(torch.tensor([0])),
                 lambda: cache.batch_repeat_interleave(2)):
        with pytest.raises(NotImplementedError, match="DenseStaticCache"):
            edit()
    assert cache.is_croppable is False


def test_padded_prefill_raises():
    cfg, model = _model()
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad(), pytest.raises(ValueError, match="padded"):
        model(torch.randint(128, (2, 4)), attention_mask=mask, past_key_values=mustafar.DenseStaticCache(cfg, 2, 8))


@pytest.mark.skipif(not __import__("mustafar.backends", fromlist=["x"]).triton_available(),
                    reason="needs Triton (a CUDA device or TRITON_INTERPRET=1)")
def test_triton_write_equals_torch_write():
    """The one-launch Triton write (CUDA, or the interpreter here) fills the buffers as index_copy_ does."""
    cfg, model = _model()
    prompt = torch.randint(128, (2, 9))
    runs = []
    for backend in ("torch", "triton"):
        cache = mustafar.DenseStaticCache(cfg, 2, 20, backend=backend)
        tokens, logits = _greedy(model, cache, prompt, 6)
        runs.append((tokens, logits, cache))
    assert runs[1][2].layers[0].fused and not runs[0][2].layers[0].fused
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for a, b in zip(runs[0][2].layers, runs[1][2].layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.length, b.length)
        assert int(b.counter) == 0
    probe = runs[1][2].layers[0].bookkeeping_probe()
    probe()
    assert int(runs[1][2].layers[0].length) == 15
    with pytest.raises(ValueError, match="backend"):
        mustafar.DenseStaticCache(cfg, 2, 20, backend="cuda")
