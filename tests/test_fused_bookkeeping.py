"""The fused decode bookkeeping and decompress kernels (Triton; the interpreter on a CPU) vs the unfused path."""

from __future__ import annotations

import pytest
import torch

from mustafar import compress
from mustafar.format import expand
from mustafar.backends import triton_available
from mustafar.cache import StaticMustafarLayer

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (a CUDA device or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(max_tokens, key_sparsity, value_sparsity, window):
    return [StaticMustafarLayer(max_tokens, key_sparsity, value_sparsity, window, backend=backend)
            for backend in ("torch", "triton")]


def _feed(layers, keys, values):
    for layer in layers:
        layer.update(keys, values)
        layer._unconsumed = False  # no attention reads these states here


def _state(layer):
    return [layer.keys, layer.values, layer.length, *layer.key_store.storage, *layer.value_store.storage]


CASES = [  # dtype, head_dim, (batch, kv_heads), window, key / value sparsity, max_tokens, prompt
    (torch.float16, 128, (2, 3), 4, 0.7, 0.5, 40, 5),
    (torch.float32, 64, (1, 2), 8, 0.5, 0.0, 30, 1),
    (torch.bfloat16, 80, (3, 1), 1, 0.3, 0.9, 20, 2),
    (torch.float16, 256, (1, 1), 16, 0.5, 0.5, 24, 3),
    (torch.float32, 96, (17, 1), 2, 0.7, 0.7, 9, 4),  # more rows than one program, store filled to capacity
]


@pytest.mark.parametrize("dtype, head_dim, bh, window, s_k, s_v, max_tokens, prompt", CASES)
def test_fused_equals_unfused_bit_for_bit(dtype, head_dim, bh, window, s_k, s_v, max_tokens, prompt):
    torch.manual_seed(head_dim + window)
    reference, fused = _pair(max_tokens, s_k, s_v, window)
    shape = (*bh, prompt, head_dim)
    _feed([reference, fused], torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype))
    assert fused.fused and not reference.fused
    for step in range(max_tokens - prompt):
        keys = torch.randn(*bh, 1, head_dim, device=DEVICE).to(dtype)
        values = torch.randn(*bh, 1, head_dim, device=DEVICE).to(dtype)
        if step % 3 == 1:  # ties among the magnitudes, signed zeros
            keys[..., : head_dim // 2] = 0.5
            values[..., ::2] = -0.0
        _feed([reference, fused], keys, values)
        for a, b in zip(_state(reference), _state(fused)):
            assert torch.equal(a, b)
    assert int(fused.length) == max_tokens and int(fused.counter) == 0


def test_bookkeeping_probe_leaves_the_cache_alone():
    torch.manual_seed(1)
    for layer in _pair(32, 0.5, 0.7, 4):
        _feed([layer], torch.randn(2, 2, 9, 64, device=DEVICE), torch.randn(2, 2, 9, 64, device=DEVICE))
        before = [t.clone() for t in _state(layer)]
        probe = layer.bookkeeping_probe()
        probe()
        probe()
        assert all(torch.equal(a, b) for a, b in zip(before, _state(layer)))


def test_fused_rejects_bad_inputs():
    from mustafar.launch.bookkeeping import fused_bookkeeping

    layer = _pair(16, 0.5, 0.5, 4)[1]
    _feed([layer], torch.randn(1, 2, 5, 64, device=DEVICE), torch.randn(1, 2, 5, 64, device=DEVICE))
    good = torch.randn(1, 2, 1, 64, device=DEVICE)
    stores = (layer.key_store, layer.value_store)
    with pytest.raises(ValueError, match="key_states"):
        fused_bookkeeping(good[:, :1], good, layer.keys, layer.values, *stores, layer.length, layer.counter)
    with pytest.raises(ValueError, match="counter"):
        fused_bookkeeping(good, good, layer.keys, layer.values, *stores, layer.length, layer.length)


@pytest.mark.parametrize("dtype, head_dim, sparsity", [(torch.float16, 128, 0.7), (torch.float32, 80, 0.5),
                                                       (torch.bfloat16, 64, 0.0), (torch.float16, 256, 0.9)])
def test_expand_kernel_equals_reference(dtype, head_dim, sparsity):
    from mustafar.launch.expand import expand_triton

    torch.manual_seed(head_dim)
    store = compress(torch.randn(2, 3, 37, head_dim, device=DEVICE).to(dtype), sparsity)
    values, bitmaps = store.storage
    out = torch.full((2, 3, 40, head_dim), 7.0, dtype=dtype, device=DEVICE)
    expand_triton(values[:, :, :37], bitmaps[:, :, :37], out[:, :, 1:38])
    assert torch.equal(out[:, :, 1:38], expand(values[:, :, :37], bitmaps[:, :, :37], head_dim))
    assert torch.equal(out[:, :, 0], torch.full_like(out[:, :, 0], 7.0))
    with pytest.raises(ValueError, match="bitmaps"):
        expand_triton(values[:, :, :37], bitmaps[:, :, :36], out[:, :, 1:38])


def test_fused_can_be_turned_off(monkeypatch):
    from mustafar.cache.static import FUSED_ENV

    layer = _pair(16, 0.5, 0.5, 4)[1]
    _feed([layer], torch.randn(1, 2, 5, 64, device=DEVICE), torch.randn(1, 2, 5, 64, device=DEVICE))
    assert layer.fused
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not layer.fused


def test_fp8_kept_values_take_the_unfused_ops():
    """The fused kernel writes kept values in the cache dtype: FP8 stores (issue 15) take the unfused ops, alike."""
    torch.manual_seed(3)
    layers = [StaticMustafarLayer(12, 0.5, 0.5, 4, backend=backend, kept_dtype=torch.float8_e4m3fn)
              for backend in ("torch", "triton")]
    _feed(layers, torch.randn(1, 2, 5, 64, device=DEVICE), torch.randn(1, 2, 5, 64, device=DEVICE))
    assert not any(layer.fused for layer in layers)
    for _ in range(4):
        _feed(layers, torch.randn(1, 2, 1, 64, device=DEVICE), torch.randn(1, 2, 1, 64, device=DEVICE))
    for a, b in zip(_state(layers[0]), _state(layers[1])):
        assert torch.equal(a, b)
    assert torch.equal(layers[0].key_store.scales, layers[1].key_store.scales)
    layers[1].bookkeeping_probe()()  # scratch stores of the layer's kept dtype
