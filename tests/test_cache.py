"""MustafarCache and the "mustafar" attention implementation, against transformers' dense SDPA path.

Tiny random models in fp32 (no hub downloads). Sparsity 0 must reproduce dense
greedy decoding token for token; sparsity > 0 must attend exactly the
per-token-pruned K/V of the compressed tokens (Mustafar, arXiv 2505.22913).
"""

import copy
import gc
import inspect
import types
import weakref

import pytest
import torch
from helpers import BATCH, DIM, HEADS, filled_cache, states
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaModel

import mustafar
import mustafar.models
from mustafar import (
    MustafarCache,
    SparsityConfig,
    StaticMustafarCache,
    bytes_per_token,
    dense_bytes_per_token,
    prune_per_token,
)
from mustafar.cache import MustafarLayer
from mustafar.ops import UnsupportedHardwareError
from mustafar.reference import decode_attention_reference

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# transformers >= 5.18 renamed the cache argument of forward/generate to `cache`.
CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "initializer_range": 0.2,
}
CONFIGS = {
    "llama": lambda: LlamaConfig(**BASE),
    "mistral": lambda: MistralConfig(**BASE, head_dim=16, sliding_window=24),  # the mask hides old tokens
    "qwen2": lambda: Qwen2Config(**BASE),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**BASE, head_dim=24, attention_bias=True),  # q/k norms, head_dim 24
}


def models(arch="llama", seed=0):
    """(sdpa model, "mustafar" model) with the same random weights, each with its own config."""
    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="sdpa").eval()
    sparse = AutoModelForCausalLM.from_config(copy.deepcopy(dense.config), attn_implementation="mustafar").eval()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def generate(model, ids, cache=None, new=40, **kwargs):
    extra = {CACHE: cache} if cache is not None else {}
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra, **kwargs)


def prompt(length, batch=1, seed=1):
    return torch.randint(BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- generate vs dense
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_generate_sparsity_zero_matches_dense(arch):
    dense, sparse = models(arch)
    ids = prompt(50)
    cache = MustafarCache(0.0, 0.0, window=8, chunk=16)
    out = generate(sparse, ids, cache)
    assert torch.equal(out, generate(dense, ids))
    assert cache.get_seq_length() == 89 and cache.layers[0].stored_tokens == 80  # crossed in prefill and decode


@pytest.mark.parametrize(
    "length, window, chunk, new", [(24, 8, 16, 20), (5, 8, 16, 30), (13, 2, 3, 40), (30, 0, 1, 10)]
)
def test_chunk_boundaries_match_dense(length, window, chunk, new):
    """Prompt of exactly window + chunk, shorter than the window, many crossings, everything compressed."""
    dense, sparse = models("llama", seed=2)
    ids = prompt(length, seed=3)
    cache = MustafarCache(0.0, 0.0, window=window, chunk=chunk)
    assert torch.equal(generate(sparse, ids, cache, new), generate(dense, ids, new=new))
    total = length + new - 1
    stored = max(0, (total - window) // chunk) * chunk
    assert [layer.stored_tokens for layer in cache.layers] == [stored] * 2
    assert cache.get_seq_length() == total and cache.layers[1].keys.shape[2] == total - stored


def test_sparse_generate_nbytes_formula():
    _, sparse = models("llama")
    cache = MustafarCache(0.5, 0.7, window=8, chunk=16)
    generate(sparse, prompt(50), cache)
    d, heads, layers = 16, 2, 2
    stored, held = cache.layers[0].stored_tokens, cache.get_seq_length()
    per_token = bytes_per_token(d, 0.5, torch.float32) + bytes_per_token(d, 0.7, torch.float32)
    dense = 2 * dense_bytes_per_token(d, torch.float32)
    assert cache.nbytes == layers * heads * (stored * per_token + (held - stored) * dense)
    assert cache.dense_nbytes == layers * heads * held * dense
    assert cache.allocated_nbytes >= cache.nbytes


def test_all_compressed_ratio_is_the_format_formula():
    _, sparse = models("qwen3")
    cache = MustafarCache(0.7, 0.7, window=0, chunk=1)
    sparse(prompt(33), **{CACHE: cache})
    assert all(layer.keys.shape[2] == 0 for layer in cache.layers)
    assert cache.nbytes / cache.dense_nbytes == bytes_per_token(24, 0.7, torch.float32) / dense_bytes_per_token(
        24, torch.float32
    )


def test_decode_attends_the_pruned_store():
    """Each decode step's logits equal a dense cache whose compressed tokens were pruned per token."""
    dense, sparse = models("llama", seed=4)
    ks, vs = 0.5, 0.7
    cache, ref, unpruned = MustafarCache(ks, vs, window=8, chunk=8), DynamicCache(), DynamicCache()
    ids = prompt(30, seed=5)
    out = sparse(ids, **{CACHE: cache}).logits
    torch.testing.assert_close(out, dense(ids, **{CACHE: ref}).logits, rtol=0, atol=1e-5)  # prefill is dense
    dense(ids, **{CACHE: unpruned})
    for step, token in enumerate(prompt(12, seed=6)[0]):
        token = token.view(1, 1)
        out = sparse(token, **{CACHE: cache}).logits
        for layer, mine in zip(ref.layers, cache.layers):
            n = mine.stored_tokens
            layer.keys[:, :, :n] = prune_per_token(layer.keys[:, :, :n], ks)
            layer.values[:, :, :n] = prune_per_token(layer.values[:, :, :n], vs)
        torch.testing.assert_close(out, dense(token, **{CACHE: ref}).logits, rtol=1e-5, atol=1e-5)
        if step == 0:
            assert (out - dense(token, **{CACHE: unpruned}).logits).abs().max() > 1e-3
    assert cache.layers[0].stored_tokens == 32  # crossed chunks during decode too


def test_batch_left_padding_matches_each_alone():
    dense, sparse = models("qwen2", seed=7)
    long, short = prompt(50, seed=8), prompt(37, seed=9)
    pad = torch.zeros(1, 13, dtype=torch.long)
    ids = torch.cat([long, torch.cat([pad, short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    out = generate(sparse, ids, MustafarCache(0.0, 0.0, window=8, chunk=16), attention_mask=mask)
    for row, alone in enumerate((long, short)):
        single = generate(sparse, alone, MustafarCache(0.0, 0.0, window=8, chunk=16))
        assert torch.equal(out[row, 50:], single[0, alone.shape[1] :])
    assert torch.equal(out, generate(dense, ids, attention_mask=mask))


# ------------------------------------------------------------ the attention implementation
def test_other_attention_implementation_raises():
    dense, _ = models("llama")
    ids = prompt(20)
    cache = MustafarCache(0.5, 0.5, window=4, chunk=4)
    torch.testing.assert_close(dense(ids, **{CACHE: cache}).logits, dense(ids).logits)  # prefill is still right
    with pytest.raises(ValueError, match='attn_implementation="mustafar"'):
        dense(prompt(1), **{CACHE: cache})


def test_mustafar_attention_with_dynamic_cache_is_sdpa():
    dense, sparse = models("mistral")
    ids = prompt(30)
    assert torch.equal(sparse(ids).logits, dense(ids).logits)
    assert torch.equal(generate(sparse, ids, DynamicCache(), 20), generate(dense, ids, new=20))


def test_set_attn_implementation_and_beams():
    dense, _ = models("llama", seed=3)
    ids = prompt(20)
    expected = generate(dense, ids, new=12, num_beams=2)
    dense.set_attn_implementation("mustafar")
    assert torch.equal(generate(dense, ids, MustafarCache(0.0, 0.0, window=4, chunk=4), 12, num_beams=2), expected)


def test_assisted_decoding_multi_token_steps_and_crop():
    """Candidate blocks (q_len > 1 over the store) and crop(-n) of rejected tokens keep dense greedy output."""
    dense, sparse = models("llama", seed=5)
    assistant = AutoModelForCausalLM.from_config(copy.deepcopy(dense.config), attn_implementation="sdpa").eval()
    weights = dense.state_dict()
    weights["lm_head.weight"] = weights["lm_head.weight"] + 0.05 * torch.randn_like(weights["lm_head.weight"])
    assistant.load_state_dict(weights)
    ids = prompt(30, seed=6)
    out = generate(sparse, ids, MustafarCache(0.0, 0.0, window=4, chunk=4), 30, assistant_model=assistant)
    assert torch.equal(out, generate(dense, ids, new=30))


def test_attention_mask_longer_and_float():
    """Masks (bool or additive float) may run past the tokens held; the extra columns are ignored."""
    torch.manual_seed(10)
    layer = MustafarLayer(0.5, 0.25, window=3, chunk=5)
    k, v = torch.randn(2, 2, 17, 32), torch.randn(2, 2, 17, 32)
    layer.update(k[:, :, :16], v[:, :, :16])
    layer.consume()
    key, value = layer.update(k[:, :, 16:], v[:, :, 16:])
    query, n = torch.randn(2, 6, 1, 32), layer.stored_tokens
    keys = torch.cat([prune_per_token(k[:, :, :n], 0.5), k[:, :, n:]], dim=2)
    values = torch.cat([prune_per_token(v[:, :, :n], 0.25), v[:, :, n:]], dim=2)
    module = types.SimpleNamespace(scaling=0.3, num_key_value_groups=3, is_causal=True)
    for mask in (torch.randn(2, 1, 1, 22), torch.rand(2, 1, 1, 22) > 0.3):
        if mask.dtype == torch.bool:
            mask[..., 16] = True  # the query's own token
        out, _ = mustafar.mustafar_attention_forward(module, query, key, value, mask, scaling=0.3)
        expected = decode_attention_reference(query, keys, values, 0.3, mask[..., :17])
        torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cover the 17 tokens"):
        mustafar.mustafar_attention_forward(module, query, key, value, torch.ones(2, 1, 1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        mustafar.mustafar_attention_forward(module, query, key, value, None, dropout=0.1)


# ----------------------------------------------------------------------- the layer
def feed(layer, sizes, seed, batch=2, heads=2, head_dim=20):
    """Update ``layer`` with random K/V blocks of ``sizes`` tokens; check the returned tensors; return all K, V."""
    gen = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for n in sizes:
        k, v = (torch.randn(batch, heads, n, head_dim, generator=gen) for _ in range(2))
        prefill = layer.get_seq_length() == 0  # the first update, of any length (issue 17)
        key, value = layer.update(k, v)
        layer.consume()
        ks.append(k), vs.append(v)
        whole = prefill or layer.stored_tokens == 0  # the prefill, or nothing pruned yet: every token, dense
        assert torch.equal(key, torch.cat(ks, 2)[:, :, layer.stored_tokens * (not whole) :])
        assert torch.equal(value, torch.cat(vs, 2)[:, :, layer.stored_tokens * (not whole) :])
    return torch.cat(ks, 2), torch.cat(vs, 2)


def check_content(layer, keys, values, length):
    n = layer.stored_tokens
    assert layer.get_seq_length() == length and n <= length
    assert torch.equal(layer.key_store.decompress(), prune_per_token(keys[:, :, :n], layer.key_sparsity))
    assert torch.equal(layer.value_store.decompress(), prune_per_token(values[:, :, :n], layer.value_sparsity))
    assert torch.equal(layer.keys, keys[:, :, n:length]) and torch.equal(layer.values, values[:, :, n:length])


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    window=st.integers(0, 6),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_layer_policy_property(sizes, window, chunk, seed):
    layer = MustafarLayer(0.4, 0.6, window, chunk)
    keys, values = feed(layer, sizes, seed)
    total, stored = sum(sizes), layer.stored_tokens
    assert stored % chunk == 0 and stored == max(0, (total - window) // chunk) * chunk
    assert min(total, window) <= layer.keys.shape[2] < window + chunk
    check_content(layer, keys, values, total)


def test_crop_reorder_and_reset():
    layer = MustafarLayer(0.5, 0.5, window=4, chunk=6)
    keys, values = feed(layer, [23, 1, 1], seed=11, batch=3)
    layer.crop(-2)  # inside the window
    check_content(layer, keys, values, 23)
    with pytest.raises(ValueError, match=r"crop\(-9\) would keep 14 .*cannot be restored. At most 1 tokens"):
        layer.crop(-9)  # 18 tokens are pruned in the store; a cache of 14 tokens prunes 6
    check_content(layer, keys, values, 23)  # nothing removed
    layer.crop(22)  # transformers 5.17 convention: keep the first 22
    check_content(layer, keys, values, 22)
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    check_content(layer, keys[[2, 0, 0]], values[[2, 0, 0]], 22)
    layer.batch_select_indices(torch.tensor([True, False, True]))
    layer.batch_repeat_interleave(2)
    check_content(layer, keys[[2, 2, 0, 0]], values[[2, 2, 0, 0]], 22)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes == 0
    feed(layer, [5], seed=12, batch=1)


def test_cache_api_and_per_layer_sparsity():
    _, sparse = models("llama")
    cache = MustafarCache.from_config(
        SparsityConfig(0.5, 0.5, window=4, chunk=8), layer_sparsity=[(0.25, 0.5), (0.75, 0.0)]
    )
    assert cache.get_seq_length() == 0 and cache.get_max_length() == -1 and not cache.is_compileable
    sparse(prompt(20), **{CACHE: cache})
    assert [(lay.key_store.sparsity, lay.value_store.sparsity) for lay in cache.layers] == [(0.25, 0.5), (0.75, 0.0)]
    assert cache.get_seq_length() == 20 and cache.get_mask_sizes(3, 0) == (23, 0)
    cache.reset()
    assert cache.get_seq_length() == 0
    sparse(prompt(9, batch=3), **{CACHE: cache})  # a new batch size after reset
    assert cache.get_seq_length() == 9
    cache = MustafarCache(window=2, chunk=2, layer_sparsity=lambda i: (0.1 * i, 0.2))
    sparse(prompt(9), **{CACHE: cache})
    assert cache.layers[1].key_store.sparsity == pytest.approx(0.1)
    alive = weakref.ref(cache.layers[0])
    del cache
    gc.collect()
    assert alive() is None  # the attention's links do not keep a cache layer alive


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"key_sparsity": 1.0}, ValueError, r"key_sparsity must be in \[0, 1\).*1.0"),
        ({"value_sparsity": -0.1}, ValueError, r"value_sparsity must be in \[0, 1\).*-0.1"),
        ({"key_sparsity": "0.5"}, TypeError, "key_sparsity must be a real number.*'0.5'"),
        ({"key_sparsity": SparsityConfig()}, TypeError, "from_config"),
        ({"window": -1}, ValueError, "window must be >= 0, got -1"),
        ({"window": 1.5}, TypeError, "window must be an int.*1.5"),
        ({"chunk": 0}, ValueError, "chunk must be >= 1, got 0"),
        ({"backend": "no-such-backend"}, ValueError, "backend must be one of.*'no-such-backend'"),
        ({"layer_sparsity": "K0.5"}, TypeError, "layer_sparsity must be a sequence.*str"),
        ({"layer_sparsity": [(0.5,)]}, TypeError, r"layer_sparsity\[0\] must be a .* pair"),
        ({"layer_sparsity": [(0.5, 1.5)]}, ValueError, r"layer_sparsity\[0\]\[1\].*got 1.5"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        MustafarCache(**kwargs)


def test_bad_use_raises():
    with pytest.raises(ValueError, match="method must be 'per-token'.*'per-channel'"):
        MustafarCache.from_config(SparsityConfig(method="per-channel"))
    with pytest.raises(TypeError, match="config must be a mustafar.SparsityConfig, got str"):
        MustafarCache.from_config("K0.5V0.5")
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="layer_sparsity must have an entry for every layer.*layer 1"):
        MustafarCache(layer_sparsity=[(0.5, 0.5)]).update(k, k, 1)
    with pytest.raises(ValueError, match=r"layer_sparsity\(0\)\[0\]"):
        MustafarCache(layer_sparsity=lambda i: (2.0, 0.5)).update(k, k, 0)
    cache = MustafarCache()
    cache.update(k, k, 0)
    cache.layers[0].consume()
    with pytest.raises(ValueError, match=r"key_states must be \[1, 2, n, 16\].*got \(2, 2, 1, 16\)"):
        cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0)
    with pytest.raises(TypeError):
        cache.crop(1.5)


# ----------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_generate(dtype):
    """On the GPU, storage follows the keys' device and dtype; decode runs the "auto" backend.

    In fp16/bf16 one decode step may deviate from an fp32 model at most twice as much as dense SDPA does.
    """
    exact, (dense, sparse) = models("llama")[0].cuda(), (model.to("cuda", dtype) for model in models("llama"))
    ids = prompt(50).cuda()
    cache = MustafarCache(0.0, 0.0, window=8, chunk=16)
    out = generate(sparse, ids, cache)
    assert cache.layers[0].key_store.device.type == "cuda" and cache.layers[0].key_store.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(out, generate(dense, ids))
    caches = MustafarCache(0.0, 0.0, window=8, chunk=16), DynamicCache(), DynamicCache()
    token, logits = prompt(1, seed=2).cuda(), []
    for model, kv in zip((sparse, dense, exact), caches):
        model(ids, **{CACHE: kv})
        logits.append(model(token, **{CACHE: kv}).logits.float())
    error, dense_error = ((x - logits[2]).abs().max().item() for x in logits[:2])
    assert error <= 2 * dense_error + 1e-4


@pytest.mark.parametrize("value", [
    lambda: torch.randn(BATCH, HEADS, 4, DIM),          # another token count
    lambda: torch.randn(BATCH, HEADS + 1, 5, DIM),      # another head count
    lambda: torch.randn(BATCH, HEADS, 5, DIM).half(),   # another dtype
    lambda: torch.randn(BATCH - 1, HEADS, 5, DIM),      # another batch
], ids=["tokens", "heads", "dtype", "batch"])
def test_first_update_refuses_values_unlike_keys(value):
    cache = MustafarCache(0.5, 0.5, window=2, chunk=4)
    with pytest.raises(ValueError, match=r"value_states must match key_states \[batch, kv_heads, n, head_dim\] "
                                         r"\(3, 2, 5, 16\) torch.float32 on cpu, got"):
        cache.update(torch.randn(BATCH, HEADS, 5, DIM), value(), 0)
    assert cache.get_seq_length() == 0 and not cache.layers[0].is_initialized


def test_later_update_refuses_values_unlike_keys():
    cache = filled_cache(layers=1)
    with pytest.raises(ValueError, match=r"value_states must match key_states.*\(3, 2, 1, 16\).*got \(3, 2, 2, 16\)"):
        cache.update(torch.randn(BATCH, HEADS, 1, DIM), torch.randn(BATCH, HEADS, 2, DIM), 0)
    assert cache.get_seq_length() == 12


def test_update_refuses_states_on_another_device():
    cache = filled_cache(layers=1)
    with pytest.raises(ValueError, match=r"key_states and value_states must be on the device of MustafarCache layer 0, "
                                         r"cpu, got meta"):
        cache.update(*states(tokens=1, device="meta"), 0)
    static = StaticMustafarCache(max_tokens=32, window=4)
    static.update(*states(tokens=6), 0)
    static.layers[0].consume()
    with pytest.raises(ValueError, match=r"must be on the device of StaticMustafarCache layer 0, cpu, got meta"):
        static.update(*states(tokens=1, device="meta"), 0)


@pytest.mark.parametrize("cache", [lambda: MustafarCache(), lambda: StaticMustafarCache(max_tokens=16)],
                         ids=["dynamic", "static"])
@pytest.mark.parametrize("layer_idx, error, match", [
    (-1, ValueError, r"layer_idx must be an int >= 0 \(the model layer\), got -1"),
    (1.0, TypeError, r"layer_idx must be an int >= 0 \(the model layer\), got float 1.0"),
    (True, TypeError, r"layer_idx must be an int >= 0 \(the model layer\), got bool True"),
    ("0", TypeError, r"layer_idx must be an int >= 0 \(the model layer\), got str '0'"),
])
def test_update_refuses_bad_layer_idx(cache, layer_idx, error, match):
    with pytest.raises(error, match=match):
        cache().update(*states(), layer_idx=layer_idx)


@pytest.mark.parametrize("make", [lambda b: MustafarCache(backend=b),
                                  lambda b: StaticMustafarCache(max_tokens=8, backend=b)], ids=["dynamic", "static"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_is_refused_at_construction(monkeypatch, make, backend):
    monkeypatch.setattr(mustafar.ops, "available_backends", lambda: ["torch"])
    with pytest.raises(UnsupportedHardwareError, match=rf"backend='{backend}' cannot run on this machine: it needs "
                                                       r".*available here: \['torch'\]"):
        make(backend)
    assert issubclass(UnsupportedHardwareError, RuntimeError)
    monkeypatch.setattr(mustafar.ops, "available_backends", lambda: ["torch", "triton", "cuda"])
    assert make(backend).backend == backend
    with pytest.raises(ValueError, match="backend must be one of"):
        make("gpu")
