"""Chunked prefill of StaticMustafarCache (issue 14): each chunk attends to everything before it, pruned as held."""

from __future__ import annotations

import pytest
import torch
import transformers

import mustafar
from mustafar.bench.decode import first_tokens
from mustafar.backends import triton_available

PROMPT, NEW = 40, 8


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar").eval()


def _run(model, cache, prompt, chunks):
    """``(greedy tokens [b, NEW], logits of the prompt's last position, cache)`` after a chunked prefill."""
    start, tokens = 0, []
    with torch.no_grad():
        for size in chunks:
            positions = torch.arange(start, start + size)[None]
            logits = model(prompt[:, start:start + size], past_key_values=cache, position_ids=positions).logits
            start += size
        first = logits[:, -1]
        for _ in range(NEW):
            tokens.append(logits[:, -1:].argmax(-1))
            logits = model(tokens[-1], past_key_values=cache, position_ids=torch.tensor([[start]])).logits
            start += 1
    return torch.cat(tokens, 1), first, cache


def _cache(cfg, sparsity, backend="torch", window=8):
    return mustafar.StaticMustafarCache(cfg, 2, PROMPT + NEW, sparsity, sparsity, window=window, dtype=torch.float32,
                                        device="cpu", backend=backend)


def _stores(cache):
    return [t for layer in cache.layers for store in (layer.key_store, layer.value_store) for t in store.storage]


CHUNKS = [[7, 5, 20, 8], [3, 3, 34], [1, 39], [39, 1], [8, 8, 8, 8, 8]]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("window", [1, 8, 32])
def test_sparsity_zero_equals_one_step(chunks, window):
    cfg, model = _model()
    prompt = torch.randint(128, (2, PROMPT))
    tokens, first, cache = _run(model, _cache(cfg, 0.0, window=window), prompt, [PROMPT])
    chunked_tokens, chunked_first, chunked = _run(model, _cache(cfg, 0.0, window=window), prompt, chunks)
    assert torch.equal(chunked_tokens, tokens)
    torch.testing.assert_close(chunked_first, first, rtol=0, atol=1e-5)
    for a, b in zip(_stores(cache), _stores(chunked)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert chunked.get_seq_length() == cache.get_seq_length() == PROMPT + NEW
    assert int(chunked.layers[1].length) == PROMPT + NEW


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparse_chunks_attend_to_pruned_tokens(sparsity):
    """At s > 0 later chunks read the earlier tokens pruned (as decoding does): the first layer's store is the
    same as after a one-step prefill (its keys do not depend on attention), the logits differ by a bounded gap.

    Measured gap (this tiny random model, fp32, window 8, chunks 7/5/20/8): max |logit difference| at the
    prompt's last position 0.037 at s = 0.5 and 0.063 at s = 0.7 (logits of magnitude ~1).
    """
    cfg, model = _model()
    prompt = torch.randint(128, (2, PROMPT))
    _, first, cache = _run(model, _cache(cfg, sparsity), prompt, [PROMPT])
    _, chunked_first, chunked = _run(model, _cache(cfg, sparsity), prompt, CHUNKS[0])
    one, many = cache.layers[0], chunked.layers[0]
    stored = PROMPT - 8
    for a, b in zip((one.key_store, one.value_store), (many.key_store, many.value_store)):
        assert torch.equal(a.storage[0][:, :, :stored], b.storage[0][:, :, :stored])
        assert torch.equal(a.storage[1][:, :, :stored], b.storage[1][:, :, :stored])
    gap = (chunked_first - first).abs().max().item()
    assert 0 < gap < 0.5


@pytest.mark.skipif(not triton_available(), reason="needs Triton (a CUDA device or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_triton_chunks_equal_torch_chunks(sparsity):
    """The Triton path (decompress kernel, fused bookkeeping) gives the torch path's stores and tokens."""
    cfg, model = _model()
    prompt = torch.randint(128, (2, PROMPT))
    tokens, _, reference = _run(model, _cache(cfg, sparsity), prompt, CHUNKS[0])
    triton_tokens, _, triton = _run(model, _cache(cfg, sparsity, backend="triton"), prompt, CHUNKS[0])
    assert torch.equal(triton_tokens, tokens)
    for a, b in zip(_stores(reference), _stores(triton)):
        assert torch.equal(a, b)


def test_bench_prefill_in_chunks():
    """``mustafar.bench.decode.first_tokens`` (``mustafar.generation.prefill``) with ``chunk``: the same first
    tokens for dense and sparse caches."""
    cfg, model = _model()
    prompt = torch.randint(128, (2, PROMPT))
    for make in (lambda: transformers.DynamicCache(), lambda: mustafar.DenseStaticCache(cfg, 2, PROMPT + 1),
                 lambda: _cache(cfg, 0.0)):
        with torch.no_grad():
            whole, chunked = first_tokens(model, make(), prompt), first_tokens(model, make(), prompt, chunk=16)
        assert torch.equal(whole, chunked)


def test_multi_token_step_after_decoding_raises():
    cfg, model = _model()
    cache = _cache(cfg, 0.5)
    _run(model, cache, torch.randint(128, (2, 10)), [10])
    with torch.no_grad(), pytest.raises(ValueError, match="only before the first one-token decode step"):
        model(torch.randint(128, (2, 3)), past_key_values=cache, position_ids=torch.arange(18, 21)[None])


def test_chunk_attention_in_row_groups(monkeypatch):
    """A batch whose history exceeds CHUNK_GROUP_BYTES is attended a few rows at a time: same logits."""
    from mustafar.cache import static_steps

    cfg, model = _model()
    prompt = torch.randint(128, (2, PROMPT))
    _, first, _ = _run(model, _cache(cfg, 0.5), prompt, CHUNKS[0])
    monkeypatch.setattr(static_steps, "CHUNK_GROUP_BYTES", 1)
    _, grouped, _ = _run(model, _cache(cfg, 0.5), prompt, CHUNKS[0])
    torch.testing.assert_close(grouped, first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", ["sparse", "dense"])
def test_chunk_steps_get_no_mask(make):
    """transformers builds no [batch, 1, chunk, held] mask for chunk steps (these caches read none)."""
    from transformers import AttentionInterface

    cfg, model = _model()
    cache = _cache(cfg, 0.5) if make == "sparse" else mustafar.DenseStaticCache(cfg, 2, PROMPT + NEW)
    masks = []
    original = AttentionInterface()["mustafar"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mustafar", spy)
    try:
        _run(model, cache, torch.randint(128, (2, PROMPT)), [20, 20])
    finally:
        AttentionInterface.register("mustafar", original)
    chunk_masks = masks[2:4]  # the second chunk, both layers
    assert all(mask is None or mask.shape[-1] == 20 for mask in chunk_masks)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_fp8_kept_values_chunks_read_the_dequantised_store(chunks):
    """FP8 kept values (issue 15): a chunk's attention reads the store dequantised with its scales. Measured
    (seed 0, s = 0.5, window 8): max |logit gap| to the cache-dtype store <= 0.0035 (logits ~0.45); without
    the scales 0.71."""
    cfg, model = _model()
    prompt = torch.randint(128, (2, PROMPT))

    def make(kept):
        return mustafar.StaticMustafarCache(cfg, 2, PROMPT + NEW, 0.5, 0.5, window=8, dtype=torch.float32,
                                            device="cpu", backend="torch", kept_dtype=kept)

    tokens, first, _ = _run(model, make(None), prompt, chunks)
    fp8_tokens, fp8_first, fp8 = _run(model, make(torch.float8_e4m3fn), prompt, chunks)
    assert fp8.layers[0].key_store.is_fp8 and fp8_tokens.shape == tokens.shape
    torch.testing.assert_close(fp8_first, first, rtol=0, atol=0.02)
