"""GPU checks of FP8 kept values (issue 15): the Triton and CUDA kernels on CUDA tensors against the reference,
and the dispatch (``"auto"`` decodes FP8 stores with the CUDA kernel on compute capability >= 8.9). Skipped
without CUDA.

Run on a CUDA machine: ``pytest -q tests/test_gpu_fp8.py``. Compression must be bit-exact (values, bitmaps,
scales); attention within the tolerances of tests/test_gpu_kernels.py: the Triton kernel dequantises exactly as
the reference does; the CUDA kernel multiplies the scores by the K scale and the softmax weights by the V scale
instead of rounding ``q * scale`` to the cache dtype, a rounding difference of the same size.
"""

from __future__ import annotations

import pytest
import torch

import mustafar
from mustafar import BitmapKV, compress, resolve_backend, sparse_decode_attention
from mustafar.cache.static_ops import static_decode_attention
from mustafar.launch.cuda import MAX_ROWS, fp8_available
from mustafar.ops import compress_into

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FP8 = torch.float8_e4m3fn
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_triton_fp8_compress_is_bit_exact_on_gpu(dtype, head_dim, sparsity):
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    x = torch.randn(3, 4, 257, head_dim, generator=gen, device="cuda")
    x = (x * torch.exp2(torch.randint(-14, 10, (3, 4, 257, 1), device="cuda", generator=gen))).to(dtype)
    x[0, 0, 0] = 0
    ref = compress(x.cpu(), sparsity, kept_dtype=FP8)
    for backend in ("auto", "triton"):
        store = BitmapKV.empty(3, 4, head_dim, sparsity, dtype=dtype, device="cuda", capacity=257, kept_dtype=FP8)
        values, bitmaps = store.storage
        compress_into(x, sparsity, values, bitmaps, 0, backend=backend, scales=store.scale_storage)
        store._tokens = 257
        assert torch.equal(store.bitmaps.cpu(), ref.bitmaps)
        assert torch.equal(store.values.view(torch.uint8).cpu(), ref.values.view(torch.uint8))
        assert torch.equal(store.scales.cpu(), ref.scales)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,kv_heads,group,tokens,window", [(1, 8, 4, 4096, 32), (3, 2, 3, 1000, 0),
                                                                 (8, 8, 4, 32768, 32)])
def test_fp8_decode_on_gpu_matches_reference(dtype, batch, kv_heads, group, tokens, window):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)  # noqa: E731
    query = rand(batch, kv_heads * group, 1, 128)
    keys = compress(rand(batch, kv_heads, tokens, 128), 0.7, kept_dtype=FP8)
    values = compress(rand(batch, kv_heads, tokens, 128), 0.5, kept_dtype=FP8)
    kw, vw = (rand(batch, kv_heads, window, 128), rand(batch, kv_heads, window, 128)) if window else (None, None)
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch")
    backends = ("auto", "triton", "cuda") if fp8_available() else ("auto", "triton")
    for backend in backends:
        out = sparse_decode_attention(query, keys, values, kw, vw, backend=backend)
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        assert _rel_err(out, ref) < TOL[dtype]
    expected = "cuda" if fp8_available() else "triton"
    assert resolve_backend("decode", query=query, key_cache=keys, value_cache=values, key_window=kw) == expected


needs_fp8_cuda = pytest.mark.skipif(not fp8_available(), reason="the CUDA FP8 decode needs compute capability >= 8.9")


def _fp8_case(batch, kv_heads, group, q_len, tokens, window, head_dim, dtype, sparsity, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)  # noqa: E731
    query = rand(batch, kv_heads * group, q_len, head_dim)
    keys, values = (compress(rand(batch, kv_heads, tokens, head_dim), sparsity, kept_dtype=FP8) for _ in range(2))
    kw = rand(batch, kv_heads, window, head_dim) if window else None
    vw = rand(batch, kv_heads, window, head_dim) if window else None
    return query, keys, values, kw, vw


@needs_fp8_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("q_len", [1, 2, 5, 8])
@pytest.mark.parametrize("window", [0, 32])
def test_cuda_fp8_decode_sweep(dtype, head_dim, group, q_len, window):
    case = _fp8_case(3, 2, group, q_len, 300, window, head_dim, dtype, 0.7, 100 * group + q_len + head_dim)
    ref = sparse_decode_attention(*case, backend="torch")
    backend = "cuda" if group * q_len <= MAX_ROWS else "auto"
    out = sparse_decode_attention(*case, backend=backend)
    assert out.shape == ref.shape and out.dtype == dtype and bool(torch.isfinite(out).all())
    assert _rel_err(out, ref) < TOL[dtype]


@needs_fp8_cuda
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 300, 32768 - 32])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_cuda_fp8_decode_token_counts_and_sparsities(tokens, sparsity):
    batch = 1 if tokens > 1000 else 3
    case = _fp8_case(batch, 8, 4, 1, tokens, 32, 128, torch.float16, sparsity, tokens)
    out = sparse_decode_attention(*case, backend="cuda")
    ref = sparse_decode_attention(*case, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float16]


@needs_fp8_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fp8_decode_extreme_rows_and_masks(dtype):
    """All-zero tokens (scale 0), tiny ones (the scale floor), tokens near the dtype's largest finite, a bool mask."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 2, 200, 128, generator=gen, device="cuda")
    x[:, :, 10] = 0
    x[:, :, 11] *= 1e-6
    x[:, :, 12] *= torch.finfo(dtype).max / 8
    keys = compress((x * 0.01).to(dtype), 0.7, kept_dtype=FP8)
    values = compress(x.to(dtype), 0.5, kept_dtype=FP8)
    query = torch.randn(2, 8, 2, 128, generator=gen, device="cuda", dtype=dtype)
    mask = torch.rand(2, 8, 2, 200, generator=gen, device="cuda") > 0.3
    ref = sparse_decode_attention(query, keys, values, attention_mask=mask, backend="torch")
    out = sparse_decode_attention(query, keys, values, attention_mask=mask, backend="cuda")
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    assert _rel_err(torch.where(finite, out, 0), torch.where(finite, ref, 0)) < TOL[dtype]


@needs_fp8_cuda
def test_cuda_fp8_decode_nan_token_gives_nan_like_the_reference():
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(1, 2, 100, 128, generator=gen, device="cuda", dtype=torch.float16)
    x[0, 1, 40, 3] = float("inf")  # its scale is NaN (mustafar.fp8's rule)
    keys = compress(x, 0.7, kept_dtype=FP8)
    values = compress(torch.randn(1, 2, 100, 128, generator=gen, device="cuda", dtype=torch.float16), 0.7,
                      kept_dtype=FP8)
    query = torch.randn(1, 8, 1, 128, generator=gen, device="cuda", dtype=torch.float16)
    out = sparse_decode_attention(query, keys, values, backend="cuda")
    ref = sparse_decode_attention(query, keys, values, backend="torch")
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(out[0, 4:]).all())
    assert _rel_err(out[0, :4], ref[0, :4]) < TOL[torch.float16]


@needs_fp8_cuda
@pytest.mark.parametrize("held", [5, 40, 1000])
def test_cuda_fp8_static_decode_matches_reference(held):
    """The graph path: whole stores with a device-side length and a ring window."""
    gen = torch.Generator(device="cuda").manual_seed(held)
    window, capacity = 32, 1024
    stores = []
    for _ in range(2):
        store = BitmapKV.empty(2, 4, 128, 0.7, dtype=torch.float16, device="cuda", capacity=capacity,
                               kept_dtype=FP8)
        if held > window:
            store.append(torch.randn(2, 4, held - window, 128, generator=gen, device="cuda", dtype=torch.float16))
        stores.append(store)
    ring = [torch.randn(2, 4, window, 128, generator=gen, device="cuda", dtype=torch.float16) for _ in range(2)]
    query = torch.randn(2, 16, 1, 128, generator=gen, device="cuda", dtype=torch.float16)
    length = torch.tensor(held, device="cuda")
    out = static_decode_attention(query, *stores, *ring, length, backend="cuda")
    ref = static_decode_attention(query, *stores, *ring, length, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float16]


def test_fp8_caches_generate_on_gpu():
    import transformers

    from mustafar.generation import cache_kwargs

    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=512, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="mustafar",
                                                          dtype=torch.float16).cuda().eval()
    ids = torch.randint(256, (2, 300), device="cuda")
    tokens = {}
    for name in ("K0.5V0.5", "K0.5V0.5-fp8", "K0.7V0.7-fp8", "K0V0-fp8"):
        cache = mustafar.MustafarCache.from_config(mustafar.parse_setting(name, window=16, chunk=64))
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        assert all(bool(torch.isfinite(s).all()) for s in out.scores)
        tokens[name] = out.sequences[:, 300:]
    assert (tokens["K0.5V0.5-fp8"] == tokens["K0.5V0.5"]).float().mean() >= 0.5
