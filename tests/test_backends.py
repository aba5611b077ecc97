"""The backend table and its one dispatcher (issue 12): priority order, explicit backends, reasons, resolution."""

from __future__ import annotations

import pytest
import torch

import mustafar
from mustafar import backends
from mustafar.backends import BACKENDS, TABLE, UnsupportedHardwareError, pick, resolve_backend, triton_available
from mustafar.ops import compress_into, sparse_decode_attention
from mustafar.cache.static_ops import static_decode_attention, static_evict


def _inputs(seed: int = 0, head_dim: int = 64):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 4, 1, head_dim, generator=gen)
    keys = mustafar.compress(torch.randn(1, 2, 9, head_dim, generator=gen), 0.5)
    values = mustafar.compress(torch.randn(1, 2, 9, head_dim, generator=gen), 0.5)
    return query, keys, values


def test_table_order_and_names():
    assert [entry.name for entry in TABLE] == ["cuda", "triton", "torch"]
    assert BACKENDS == ("auto", "torch", "triton", "cuda")
    assert mustafar.resolve_backend is resolve_backend
    assert mustafar.UnsupportedHardwareError is UnsupportedHardwareError
    assert issubclass(UnsupportedHardwareError, RuntimeError)


def test_auto_on_the_cpu_is_the_reference_for_every_op():
    query, keys, values = _inputs(1)
    assert resolve_backend("decode", query=query, key_cache=keys, value_cache=values) == "torch"
    assert resolve_backend("static_decode", query=query, key_cache=keys, value_cache=values,
                           key_window=query) == "torch"
    x = torch.randn(1, 2, 3, 64)
    assert resolve_backend("compress", x=x, values=keys.values, bitmaps=keys.bitmaps) == "torch"
    assert resolve_backend("static_evict", x=x, values=keys.values, bitmaps=keys.bitmaps) == "torch"


def test_explicit_torch_is_served_everywhere():
    query, keys, values = _inputs(2)
    assert resolve_backend("decode", "torch", query=query, key_cache=keys, value_cache=values) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusals")
def test_explicit_cuda_on_the_cpu_says_why():
    query, keys, values = _inputs(3)
    with pytest.raises(UnsupportedHardwareError, match=r"backend='cuda' cannot serve this decode: .*CUDA tensors"):
        pick("decode", "cuda", query=query, key_cache=keys, value_cache=values)
    with pytest.raises(UnsupportedHardwareError, match="backend='cuda'"):
        sparse_decode_attention(query, keys, values, backend="cuda")
    x = torch.randn(1, 2, 3, 64)
    store = mustafar.BitmapKV.empty(1, 2, 64, 0.5, dtype=torch.float32, capacity=3)
    with pytest.raises(UnsupportedHardwareError, match="backend='cuda' cannot serve this compress"):
        compress_into(x, 0.5, *store.storage, 0, backend="cuda")
    ring = torch.randn(1, 2, 4, 64)
    with pytest.raises(UnsupportedHardwareError, match="backend='cuda' cannot serve this static_evict"):
        static_evict(ring, store, torch.tensor(5), backend="cuda")
    with pytest.raises(UnsupportedHardwareError, match="backend='cuda' cannot serve this static_decode"):
        static_decode_attention(query, keys, values, ring, ring, torch.tensor(5), backend="cuda")


@pytest.mark.skipif(not triton_available() or torch.cuda.is_available(), reason="needs the Triton interpreter")
def test_explicit_triton_runs_under_the_interpreter_but_auto_does_not():
    query, keys, values = _inputs(4)
    assert resolve_backend("decode", "triton", query=query, key_cache=keys, value_cache=values) == "triton"
    assert resolve_backend("decode", query=query, key_cache=keys, value_cache=values) == "torch"


def test_triton_has_no_static_form_and_serves_static_ops_as_auto():
    query, keys, values = _inputs(5)
    ring = torch.randn(1, 2, 4, 64)
    assert resolve_backend("static_decode", "triton", query=query, key_cache=keys, value_cache=values,
                           key_window=ring) == resolve_backend("static_decode", query=query, key_cache=keys,
                                                               value_cache=values, key_window=ring)


def test_unknown_backend_and_op_are_value_errors():
    query, keys, values = _inputs(6)
    with pytest.raises(ValueError, match=r"backend must be one of .*'nope'"):
        pick("decode", "nope", query=query, key_cache=keys, value_cache=values)
    with pytest.raises(ValueError, match=r"op must be one of .*'encode'"):
        pick("encode", query=query)


def test_available_backends_are_table_entries_that_can_run():
    available = backends.available_backends()
    assert available[0] == "torch"
    assert set(available) <= set(BACKENDS[1:])
    assert ("triton" in available) == triton_available()


class _Doubling:
    """A new backend: one class, one entry. Decodes as the reference, times two (so its use is visible)."""

    name = "doubling"
    auto_devices = None

    def unavailable(self):
        return None

    def supports_decode(self, query, **_):
        return None if query.dtype == torch.float32 else f"fp32 only, got {query.dtype}"

    def decode(self, query, key_cache, value_cache, key_window, value_window, scale, attention_mask):
        return 2 * backends.TorchBackend().decode(query, key_cache, value_cache, key_window, value_window, scale,
                                                  attention_mask)


def test_a_new_backend_is_one_entry(monkeypatch):
    monkeypatch.setattr(backends, "TABLE", (_Doubling(),) + backends.TABLE)
    query, keys, values = _inputs(7)
    assert resolve_backend("decode", query=query, key_cache=keys, value_cache=values) == "doubling"
    torch.testing.assert_close(sparse_decode_attention(query, keys, values),
                               2 * sparse_decode_attention(query, keys, values, backend="torch"))
    half = _inputs(8)
    half = (half[0].half(), mustafar.compress(half[1].decompress().half(), 0.5),
            mustafar.compress(half[2].decompress().half(), 0.5))
    assert resolve_backend("decode", query=half[0], key_cache=half[1], value_cache=half[2]) == "torch"
    # an op the new entry lacks falls through to the next entries
    x = torch.randn(1, 2, 3, 64)
    assert resolve_backend("compress", x=x, values=keys.values, bitmaps=keys.bitmaps) == "torch"
