"""The shared generation helpers (issue 12): one make_cache, prefill, KV-bytes count and dtype parser."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import mustafar
from mustafar.bench.models import build_model
from mustafar.generation import DTYPES, MODES, KVBytes, kv_bytes, make_cache, parse_dtype, prefill


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", dtype="float32", device="cpu")


def test_parse_dtype():
    for name, dtype in DTYPES.items():
        assert parse_dtype(name) is dtype and parse_dtype(dtype) is dtype
    assert parse_dtype("auto", allow_auto=True) == "auto"
    for bad in ("auto", "int8", torch.int8, 16, None):
        with pytest.raises(ValueError, match=r"dtype must be a torch.dtype or one of float32, bfloat16, float16"):
            parse_dtype(bad)
    with pytest.raises(ValueError, match=r"one of 'auto', float32"):
        parse_dtype("fp16", allow_auto=True)


def test_make_cache_modes(model):
    dense, sparse = mustafar.parse_setting("dense"), mustafar.parse_setting("K0.5V0.7", window=8, chunk=16)
    assert MODES == ("generate", "graph")
    assert isinstance(make_cache(dense), DynamicCache)
    assert isinstance(make_cache(sparse), mustafar.MustafarCache)
    assert make_cache(sparse, backend="torch").backend == "torch"
    assert isinstance(make_cache(dense, "graph", model=model, batch=2, max_tokens=32), StaticCache)
    static = make_cache(sparse, "graph", model=model, batch=2, max_tokens=32, backend="torch")
    assert isinstance(static, mustafar.StaticMustafarCache) and static.backend == "torch"
    with pytest.raises(ValueError, match=r"mode must be one of \('generate', 'graph'\), got 'eager'"):
        make_cache(sparse, "eager")
    with pytest.raises(ValueError, match="mode 'graph' needs model, batch and max_tokens"):
        make_cache(sparse, "graph", model=model)
    with pytest.raises(TypeError, match="config must be a mustafar.SparsityConfig, got str"):
        make_cache("K0.5V0.5")


def test_prefill_into_a_given_cache_equals_the_dense_prefill(model):
    ids = torch.randint(512, (2, 40), generator=torch.Generator().manual_seed(3))
    source, logits = prefill(model, ids)
    assert isinstance(source, DynamicCache) and source.get_seq_length() == 40
    assert logits.shape == (2, model.config.vocab_size) and logits.dtype == torch.float32
    cache = mustafar.MustafarCache(0.5, 0.5, window=8, chunk=16)
    again, sparse_logits = prefill(model, ids, cache)
    assert again is cache and cache.get_seq_length() == 40
    torch.testing.assert_close(sparse_logits, logits)  # the prefill attends dense
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, n\] tensor with n >= 1"):
        prefill(model, ids[:, :0])


def test_kv_bytes_of_every_cache(model):
    ids = torch.randint(512, (2, 40), generator=torch.Generator().manual_seed(4))
    dense, _ = prefill(model, ids)
    kv = kv_bytes(dense)
    per_token = 2 * 2 * 2 * 64 * 4  # layers x (K, V) x kv_heads x head_dim x fp32 bytes, per batch row
    assert kv == KVBytes(2 * 40 * per_token, 2 * 40 * per_token, 2 * 40 * per_token) and kv.ratio == 1.0
    sparse, _ = prefill(model, ids, mustafar.MustafarCache(0.5, 0.5, window=8, chunk=16))
    kv = kv_bytes(sparse)
    assert (kv.held, kv.dense, kv.allocated) == (sparse.nbytes, sparse.dense_nbytes, sparse.allocated_nbytes)
    assert kv.held < kv.dense and kv.ratio == kv.held / kv.dense
    static = make_cache(mustafar.parse_setting("K0.5V0.5", window=8), "graph", model=model, batch=2, max_tokens=48,
                        backend="torch")
    prefill(model, ids, static)
    kv = kv_bytes(static)
    assert kv.held == kv.allocated == static.allocated_nbytes and kv.dense == 2 * 48 * per_token
    assert kv_bytes(DynamicCache()) == KVBytes(0, 0, 0) and KVBytes(0, 0, 0).ratio is None
    with pytest.raises(TypeError, match="cache must be a transformers Cache or a mustafar cache, got dict"):
        kv_bytes({})
