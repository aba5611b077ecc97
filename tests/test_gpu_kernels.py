"""GPU checks of the CUDA and Triton kernels against the PyTorch references (skipped without CUDA).

Run on a CUDA machine: ``pytest -q tests/test_gpu_kernels.py``. The same shapes at full size
are checked by ``benchmarks/attention.py --check``.
"""

from __future__ import annotations

import pytest
import torch

from mustafar import compress
from mustafar.format import BitmapKV
from mustafar.ops import compress_into, sparse_decode_attention
from mustafar.reference import compress_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _random_case(batch, kv_heads, group, q_len, tokens, window, head_dim, dtype, sparsity, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    query = rand(batch, kv_heads * group, q_len, head_dim)
    keys = compress(rand(batch, kv_heads, tokens, head_dim), sparsity)
    values = compress(rand(batch, kv_heads, tokens, head_dim), sparsity)
    key_window = rand(batch, kv_heads, window, head_dim) if window else None
    value_window = rand(batch, kv_heads, window, head_dim) if window else None
    return query, keys, values, key_window, value_window


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "batch,kv_heads,group,q_len,tokens,window",
    [(1, 1, 1, 1, 1, 0), (3, 2, 3, 1, 63, 5), (1, 8, 4, 1, 64, 0), (2, 3, 3, 1, 65, 32), (1, 4, 8, 2, 300, 17),
     (2, 2, 4, 4, 1000, 40), (1, 8, 4, 1, 5000, 32), (3, 1, 16, 1, 777, 0), (1, 2, 2, 1, 0, 20)],
)
def test_decode_matches_reference(backend, dtype, head_dim, batch, kv_heads, group, q_len, tokens, window):
    case = _random_case(batch, kv_heads, group, q_len, tokens, window, head_dim, dtype, 0.7, tokens + window)
    out = sparse_decode_attention(*case, backend=backend)
    ref = sparse_decode_attention(*case, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_with_bool_mask(backend):
    query, keys, values, kw, vw = _random_case(2, 4, 4, 2, 500, 20, 128, torch.float16, 0.5, 7)
    mask = torch.rand(2, 1, 2, 520, device="cuda") > 0.3
    out = sparse_decode_attention(query, keys, values, kw, vw, backend=backend, attention_mask=mask)
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch", attention_mask=mask)
    assert _rel_err(out, ref) < TOL[torch.float16]


def test_decode_sparsity_zero_equals_dense_sdpa():
    query, keys, values, kw, vw = _random_case(2, 8, 4, 1, 3000, 32, 128, torch.float16, 0.0, 11)
    out = sparse_decode_attention(query, keys, values, kw, vw, backend="cuda")
    k = torch.cat([keys.decompress(), kw], 2)
    v = torch.cat([values.decompress(), vw], 2)
    ref = torch.nn.functional.scaled_dot_product_attention(query, k, v, enable_gqa=True)
    assert _rel_err(out, ref) < TOL[torch.float16]


def test_decode_store_with_spare_capacity():
    """A store grown by appends (capacity > tokens, stale rows past the end) gives the same result."""
    query, keys, values, kw, vw = _random_case(1, 2, 4, 1, 100, 8, 128, torch.float16, 0.7, 3)
    grown_k = BitmapKV.empty(1, 2, 128, 0.7, torch.float16, "cuda", capacity=1000)
    grown_v = BitmapKV.empty(1, 2, 128, 0.7, torch.float16, "cuda", capacity=1000)
    grown_k.append_compressed(keys.values, keys.bitmaps)
    grown_v.append_compressed(values.values, values.bitmaps)
    grown_k._bitmaps[:, :, 100:] = -1  # stale garbage past the token count must be ignored
    out = sparse_decode_attention(query, grown_k, grown_v, kw, vw, backend="cuda")
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.99])
def test_compress_bit_exact(backend, dtype, head_dim, sparsity):
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(3, 4, 333, head_dim, generator=gen, device="cuda", dtype=dtype)
    x[..., 7] = x[..., 3]  # ties
    x[..., 9] = -x[..., 3]
    x[0, 0, 0] = 0.0
    store = BitmapKV.empty(3, 4, head_dim, sparsity, dtype, "cuda", capacity=400)
    store._values.fill_(7.0)
    compress_into(x, sparsity, store._values, store._bitmaps, 5, backend=backend)
    ref_values, ref_bitmaps = compress_reference(x, sparsity)
    assert torch.equal(store._values[:, :, 5:338], ref_values)
    assert torch.equal(store._bitmaps[:, :, 5:338], ref_bitmaps)
    assert (store._values[:, :, :5] == 7.0).all() and (store._values[:, :, 338:] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_compress_rows_with_nan_keep_k_keep_entries_like_the_reference(dtype, head_dim):
    """NaN entries rank above every magnitude (the reference's sort), lower channels first; never more than k_keep
    kept (an earlier kernel kept every NaN on top of k_keep entries and overran the row)."""
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    x = torch.randn(2, 2, 150, head_dim, generator=gen, device="cuda", dtype=dtype)
    x[0, 0, 3, [5, 9, 30]] = float("nan")
    x[0, 1, 4, : head_dim - 3] = float("nan")  # more NaNs than k_keep
    x[1, 0, 5, [1, 2]] = float("inf")
    x[1, 1, 6] = float("nan")
    store = BitmapKV.empty(2, 2, head_dim, 0.7, dtype, "cuda", capacity=160)
    compress_into(x, 0.7, store._values, store._bitmaps, 0, backend="cuda")
    ref_values, ref_bitmaps = compress_reference(x, 0.7)
    assert torch.equal(store._bitmaps[:, :, :150], ref_bitmaps)
    assert torch.equal(store._values[:, :, :150].view(torch.int16), ref_values.view(torch.int16))


@pytest.mark.parametrize("length", [5, 32, 33, 700])
def test_static_ops_cuda_match_torch(length):
    """The graph-capturable ops read the token count on the device; CUDA equals the reference."""
    from mustafar.cache.static_ops import static_decode_attention, static_evict

    gen = torch.Generator(device="cuda").manual_seed(length)
    w, cap = 32, 1024
    ring = torch.randn(2, 4, w, 128, generator=gen, device="cuda", dtype=torch.float16)
    stores = []
    for _ in range(2):
        store = BitmapKV.empty(2, 4, 128, 0.7, torch.float16, "cuda", capacity=cap)
        store.append(torch.randn(2, 4, cap, 128, generator=gen, device="cuda", dtype=torch.float16))
        stores.append(store)
    n = torch.tensor(length, device="cuda")
    query = torch.randn(2, 16, 1, 128, generator=gen, device="cuda", dtype=torch.float16)
    out = static_decode_attention(query, *stores, ring, ring.flip(2), n, backend="cuda")
    ref = static_decode_attention(query, *stores, ring, ring.flip(2), n, backend="torch")
    assert _rel_err(out, ref) < TOL[torch.float16]
    copies = [BitmapKV.empty(2, 4, 128, 0.7, torch.float16, "cuda", capacity=cap) for _ in range(2)]
    for copy in copies:
        copy.storage[0].copy_(stores[0].storage[0])
        copy.storage[1].copy_(stores[0].storage[1])
    static_evict(ring, copies[0], n, backend="cuda")
    static_evict(ring, copies[1], n, backend="torch")
    assert torch.equal(copies[0].storage[0], copies[1].storage[0])
    assert torch.equal(copies[0].storage[1], copies[1].storage[1])


def test_static_cache_graph_replay_matches_eager():
    """One decode step captured in a CUDA graph and replayed gives the tokens of the eager loop."""
    import transformers

    import mustafar

    cfg = transformers.LlamaConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=1024, vocab_size=256)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar",
                                                              dtype=torch.float16).eval()
    prompt = torch.randint(256, (2, 100), device="cuda")

    def run(capture: bool, steps: int = 40) -> torch.Tensor:
        cache = mustafar.StaticMustafarCache(cfg, 2, 200, 0.7, 0.7, window=32, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            positions = torch.arange(100, device="cuda").expand(2, 100)
            logits = model(prompt, past_key_values=cache, position_ids=positions).logits
            ids, pos = logits[:, -1:].argmax(-1), torch.full((2, 1), 100, device="cuda")

            def step():  # positions passed explicitly: a graph replay does not advance host-side counters
                return model(ids, past_key_values=cache, position_ids=pos).logits[:, -1:].argmax(-1)

            out = [step()]  # one eager step first (also warms up every kernel before a capture)
            ids.copy_(out[-1])
            pos += 1
            if capture:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.stream(stream), torch.cuda.graph(graph):
                    nxt = step()
                torch.cuda.current_stream().wait_stream(stream)
            for _ in range(steps - 1):
                if capture:
                    graph.replay()
                else:
                    nxt = step()
                out.append(nxt.clone())
                ids.copy_(nxt)
                pos += 1
        return torch.cat(out, 1)

    assert torch.equal(run(capture=True), run(capture=False))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernels_run_on_the_tensors_device_not_the_current_one(backend):
    """A layer on cuda:1 (``device_map``) while cuda:0 is current: the kernels must launch on cuda:1."""
    assert torch.cuda.current_device() == 0
    query, keys, values, kw, vw = _random_case(2, 4, 4, 1, 700, 20, 128, torch.float16, 0.7, 11, device="cuda:1")
    out = sparse_decode_attention(query, keys, values, kw, vw, backend=backend)
    ref = sparse_decode_attention(query, keys, values, kw, vw, backend="torch")
    assert out.device == torch.device("cuda:1") and _rel_err(out, ref) < TOL[torch.float16]
    x = torch.randn(2, 4, 99, 128, device="cuda:1", dtype=torch.float16)
    store = BitmapKV.empty(2, 4, 128, 0.7, torch.float16, "cuda:1", capacity=128)
    compress_into(x, 0.7, store._values, store._bitmaps, 0, backend=backend)
    ref_values, ref_bitmaps = compress_reference(x, 0.7)
    assert torch.equal(store._values[:, :, :99], ref_values) and torch.equal(store._bitmaps[:, :, :99], ref_bitmaps)
    assert torch.cuda.current_device() == 0
