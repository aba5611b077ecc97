"""GPU checks of FP8 kept values (issue 15): the Triton kernels on CUDA tensors against the reference, and the
dispatch (``"auto"`` sends FP8 stores to Triton, ``"cuda"`` refuses them). Skipped without CUDA.

Run on a CUDA machine: ``pytest -q tests/test_gpu_fp8.py``. Compression must be bit-exact (values, bitmaps,
scales); attention within the tolerances of tests/test_gpu_kernels.py (the kernel dequantises exactly as
the reference does).
"""

from __future__ import annotations

import pytest
import torch

import mustafar
from mustafar import BitmapKV, compress, sparse_decode_attention
from mustafar.ops import UnsupportedHardwareError, compress_into

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
    for backend in ("auto", "triton"):
        out = sparse_decode_attention(query, keys, values, kw, vw, backend=backend)
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        assert _rel_err(out, ref) < TOL[dtype]
    with pytest.raises(UnsupportedHardwareError, match="FP8"):
        sparse_decode_attention(query, keys, values, kw, vw, backend="cuda")


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
