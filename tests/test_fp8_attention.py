"""Decode attention over FP8 kept values (issue 15): Triton against the reference, FP8 against the cache dtype,
the caches and generate() with ``kept_dtype=torch.float8_e4m3fn``, the ``-fp8`` settings.

Tolerances. Triton against the reference on the same FP8 store: the kernel dequantises exactly as the
reference (same bits in the cache dtype), so the attention tolerances of tests/test_kernels.py apply
(relative L2 error 1e-5 fp32, 2e-3 fp16, 1.5e-2 bf16). FP8 store against the cache-dtype store (the
quantisation error): relative L2 error below 2**-4 = 6.25 %, e4m3's largest relative rounding error
(half its 3-bit mantissa step); random normal data measures about 3.6 %.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

import mustafar
from mustafar import compress, parse_setting, sparse_decode_attention
from mustafar.cache.rules import prune_rows_prefix
from mustafar.generation import cache_kwargs
from mustafar.launch.common import interpreting
from mustafar.ops import UnsupportedHardwareError
from mustafar.cache.static_ops import static_decode_attention

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
FP8_TOL = 2.0 ** -4
needs_triton = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors: TRITON_INTERPRET=1 "
                                  "(tests/test_gpu_fp8.py runs it on a GPU)")


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _case(batch, kv_heads, group, tokens, window, head_dim, dtype, seed, k_fp8=True, v_fp8=True):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    query = rand(batch, kv_heads * group, 1, head_dim)
    keys, values = rand(batch, kv_heads, tokens, head_dim), rand(batch, kv_heads, tokens, head_dim)
    kc = compress(keys, 0.7, kept_dtype=FP8 if k_fp8 else None)
    vc = compress(values, 0.5, kept_dtype=FP8 if v_fp8 else None)
    kw, vw = (rand(batch, kv_heads, window, head_dim), rand(batch, kv_heads, window, head_dim)) if window else (
        None, None)
    return query, kc, vc, kw, vw, keys, values


CASES = [
    (b, h, g, t, w, d, dt)
    for (b, h, g), t, w, (d, dt) in itertools.product(
        [(1, 1, 1), (3, 2, 3), (1, 2, 4)], [1, 65, 300], [0, 9],
        [(64, torch.float32), (80, torch.float16), (128, torch.float16), (128, torch.bfloat16)],
    )
    if (t + w + d + g) % 3 == 0 or t == 1
]


@needs_triton
@pytest.mark.parametrize("batch,kv_heads,group,tokens,window,head_dim,dtype", CASES)
def test_triton_fp8_decode_matches_reference(batch, kv_heads, group, tokens, window, head_dim, dtype):
    query, kc, vc, kw, vw, _, _ = _case(batch, kv_heads, group, tokens, window, head_dim, dtype, seed=tokens + window)
    out = sparse_decode_attention(query, kc, vc, kw, vw, backend="triton")
    ref = sparse_decode_attention(query, kc, vc, kw, vw, backend="torch")
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert _rel_err(out, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("k_fp8,v_fp8", [(True, False), (False, True)])
def test_triton_mixed_kept_dtypes(k_fp8, v_fp8):
    query, kc, vc, kw, vw, _, _ = _case(2, 2, 3, 70, 5, 64, torch.float16, seed=1, k_fp8=k_fp8, v_fp8=v_fp8)
    out = sparse_decode_attention(query, kc, vc, kw, vw, backend="triton")
    assert _rel_err(out, sparse_decode_attention(query, kc, vc, kw, vw, backend="torch")) < TOL[torch.float16]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_attention_within_e4m3_error_of_the_cache_dtype(sparsity, dtype):
    gen = torch.Generator().manual_seed(int(10 * sparsity))
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    query, keys, values = rand(2, 8, 1, 128), rand(2, 2, 200, 128), rand(2, 2, 200, 128)
    fp8 = sparse_decode_attention(query, compress(keys, sparsity, FP8), compress(values, sparsity, FP8))
    full = sparse_decode_attention(query, compress(keys, sparsity), compress(values, sparsity))
    assert fp8.dtype == dtype and 0 < _rel_err(fp8, full) < FP8_TOL


def test_cuda_backend_refuses_fp8_stores_it_cannot_read_with_the_reason():
    """CPU tensors: the device; a key store in FP8 with a value store in the cache dtype: the mix (CUDA reads FP8
    kept values on compute capability >= 8.9 when both stores hold them; tests/test_gpu_fp8.py)."""
    query, kc, vc, kw, vw, _, _ = _case(1, 1, 2, 10, 0, 64, torch.float16, seed=3)
    with pytest.raises(UnsupportedHardwareError, match="CUDA tensors"):
        sparse_decode_attention(query, kc, vc, backend="cuda")
    plain = compress(vc.decompress(), vc.sparsity)
    with pytest.raises(UnsupportedHardwareError, match="both the key and the value store"):
        sparse_decode_attention(query, kc, plain, backend="cuda")


def test_static_decode_attention_reads_fp8_stores():
    """A full static store (capacity = tokens, a multiple of 16) and a full ring: the same attention."""
    query, kc, vc, kw, vw, _, _ = _case(2, 2, 2, 48, 6, 64, torch.float16, seed=4)
    assert kc.capacity == kc.tokens == 48
    out = static_decode_attention(query, kc, vc, kw, vw, torch.tensor(48 + 6))
    ref = sparse_decode_attention(query, kc, vc, kw, vw, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_window_tokens_pruned_on_the_fly_match_the_fp8_store(sparsity):
    window = torch.randn(2, 2, 10, 64, dtype=torch.float16)
    lags = [4, 7]
    out = prune_rows_prefix(window, lags, sparsity, fp8=True)
    stored = compress(window, sparsity, kept_dtype=FP8).decompress()
    for row, lag in enumerate(lags):
        assert torch.equal(out[row, :, :lag], stored[row, :, :lag])
        assert torch.equal(out[row, :, lag:], window[row, :, lag:])


def _tiny(arch: str):
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="mustafar").eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_with_fp8_caches(arch):
    model = _tiny(arch)
    ids = torch.randint(128, (2, 40), generator=torch.Generator().manual_seed(1))
    tokens = {}
    runs = [(name, "torch") for name in ("K0.5V0.5", "K0.5V0.5-fp8", "K0V0-fp8")]
    runs += [("K0.5V0.5-fp8", "triton")] if interpreting() else []  # the interpreter is slow: one setting
    for name, backend in runs:
        cache = mustafar.MustafarCache.from_config(parse_setting(name, window=8, chunk=16), backend=backend)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=10, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        assert all(bool(torch.isfinite(s).all()) for s in out.scores)
        tokens[name, backend] = out.sequences[:, 40:]
        assert cache.layers[0].key_store.is_fp8 == name.endswith("-fp8")
        assert cache.nbytes < cache.dense_nbytes
    for name, backend in tokens:
        agree = (tokens[name, backend] == tokens["K0.5V0.5", "torch"]).float().mean().item()
        assert agree >= 0.5, (name, backend, agree)  # FP8 noise may flip a near-tie of a random model
    if interpreting():
        assert (tokens["K0.5V0.5-fp8", "triton"] == tokens["K0.5V0.5-fp8", "torch"]).float().mean() >= 0.9


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_with_fp8_matches_the_dynamic_one(arch):
    model = _tiny(arch)
    ids = torch.randint(128, (1, 30), generator=torch.Generator().manual_seed(2))
    static = mustafar.StaticMustafarCache(model.config, batch_size=1, max_tokens=48, key_sparsity=0.5,
                                          value_sparsity=0.5, window=8, kept_dtype=FP8)
    dynamic = mustafar.MustafarCache(0.5, 0.5, window=8, chunk=1, kept_dtype=FP8, backend="torch")
    logits_s = model(ids, **cache_kwargs(model, static), position_ids=torch.arange(30)[None]).logits
    logits_d = model(ids, **cache_kwargs(model, dynamic)).logits
    for step in range(8):
        token = logits_d[:, -1:].argmax(-1)
        position = torch.tensor([[30 + step]])
        logits_s = model(token, **cache_kwargs(model, static), position_ids=position).logits
        logits_d = model(token, **cache_kwargs(model, dynamic), position_ids=position).logits
        assert bool(torch.isfinite(logits_s).all())
        assert torch.allclose(logits_s, logits_d, atol=1e-4, rtol=1e-4)
    assert static.layers[0].key_store.is_fp8 and "float8_e4m3fn" in repr(static)
    assert static.nbytes == dynamic.nbytes


def test_fp8_settings_registry_and_parsing():
    for name in ("K0.7V0.7-fp8", "K0.5V0.5-fp8", "K0V0-fp8"):
        config = mustafar.SETTINGS[name]
        assert config.name == name and config.fp8 and not config.is_dense
        assert parse_setting(name) == config and config.kept_dtype == "float8_e4m3fn"
    assert parse_setting("dense-fp8").name == "K0V0-fp8" and parse_setting("dense").is_dense
    assert mustafar.SparsityConfig(0.5, 0.5, kept_dtype=FP8) == parse_setting("K0.5V0.5-fp8")
    with pytest.raises(ValueError, match="per-token"):
        mustafar.SparsityConfig(0.5, 0.5, method="per-channel", kept_dtype="fp8")
    with pytest.raises(ValueError, match="K0.5V0.5-fp8"):
        parse_setting("K0.5V0.5-fp4")


def test_eval_runs_fp8_settings_with_the_per_token_method_only():
    from mustafar.evaluation.runner import run_configs

    class Config:
        settings = (parse_setting("dense"), parse_setting("K0.5V0.5"), parse_setting("K0.5V0.5-fp8"))
        methods = ("per-token", "per-channel")

    names = [(c.method, c.name) for c in run_configs(Config)]
    assert names == [("per-token", "dense"), ("per-token", "K0.5V0.5"), ("per-token", "K0.5V0.5-fp8"),
                     ("per-channel", "K0.5V0.5")]


def test_bench_memory_model_counts_fp8_bytes():
    from mustafar.bench.memory import predict_bytes

    dims = dict(layers=32, kv_heads=8, head_dim=128, q_heads=32, hidden=4096, intermediate=14336, vocab=128256)
    kv = {name: predict_bytes(dims, parse_setting(name), "graph", 8, 32768, 0)["kv"]
          for name in ("dense", "K0.7V0.7", "K0.7V0.7-fp8", "K0.5V0.5-fp8", "K0V0-fp8")}
    assert kv["K0.7V0.7-fp8"] / kv["dense"] <= 0.23 and kv["K0.5V0.5-fp8"] / kv["dense"] <= 0.33
    assert kv["K0.7V0.7-fp8"] < kv["K0.7V0.7"] and 0.5 < kv["K0V0-fp8"] / kv["dense"] < 0.6


def test_cli_generate_refuses_an_unknown_kept_dtype():
    from typer.testing import CliRunner

    from mustafar.cli import app

    result = CliRunner().invoke(app, ["generate", "hi", "--kept-dtype", "int8"])
    assert result.exit_code == 2 and "kept_dtype" in result.output and "int8" in result.output


def test_backend_table_reports_the_fp8_capability():
    """The CUDA entry of the table says why it does not serve these FP8 stores; "auto" then picks another entry."""
    from mustafar.backends import CudaBackend, resolve_backend

    query, kc, vc, _, _, _, _ = _case(1, 2, 2, 20, 0, 64, torch.float16, seed=6)
    cuda = CudaBackend()
    assert "CUDA tensors" in cuda.supports_decode(query=query, key_cache=kc, value_cache=vc)
    assert "CUDA tensors" in cuda.supports_static_decode(query=query, key_cache=kc, value_cache=vc, key_window=None)
    values, bitmaps = kc.storage
    assert "CUDA tensors" in cuda.supports_compress(x=query, values=values, bitmaps=bitmaps)  # it writes FP8 on CUDA
    assert resolve_backend("decode", query=query, key_cache=kc, value_cache=vc) == "torch"


def test_generation_and_bench_caches_carry_the_kept_dtype():
    from mustafar.bench.caches import compress_op
    from mustafar.generation import make_cache

    model = _tiny("llama")
    setting = parse_setting("K0.7V0.7-fp8", window=8, chunk=16)
    dynamic = make_cache(setting)
    static = make_cache(setting, "graph", model=model, batch=1, max_tokens=64)
    assert dynamic.config.fp8 and "kept_dtype=float8_e4m3fn" in repr(static)
    ids = torch.randint(128, (1, 40), generator=torch.Generator().manual_seed(3))
    model(ids, **cache_kwargs(model, dynamic))
    assert dynamic.layers[0].key_store.is_fp8
    compress_op(dynamic, setting, 1, model).run()  # the bench's timed compression writes FP8 stores


def test_multi_token_step_equals_token_by_token_with_fp8():
    """Issue 17's rule holds with FP8 kept values: a 6-token step crossing chunk boundaries reads what
    token-by-token decoding reads (window tokens pruned on the fly are quantised like the store)."""
    model = _tiny("llama")
    ids = torch.randint(128, (1, 30), generator=torch.Generator().manual_seed(4))
    step = torch.randint(128, (1, 6), generator=torch.Generator().manual_seed(5))
    caches = [mustafar.MustafarCache(0.5, 0.5, window=4, chunk=4, kept_dtype=FP8, backend="torch") for _ in range(2)]
    for cache in caches:
        model(ids, **cache_kwargs(model, cache))
    together = model(step, **cache_kwargs(model, caches[0]), position_ids=torch.arange(30, 36)[None]).logits
    one_by_one = torch.cat([model(step[:, i:i + 1], **cache_kwargs(model, caches[1]),
                                  position_ids=torch.tensor([[30 + i]])).logits for i in range(6)], dim=1)
    assert torch.allclose(together, one_by_one, atol=1e-4, rtol=1e-4)
    assert caches[0].layers[0].key_store.is_fp8
