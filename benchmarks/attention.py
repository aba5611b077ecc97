"""Decode attention and compress kernels vs dense SDPA on one GPU (issue 7's benchmark).

Usage (on a CUDA machine, from the repository root):

    PYTHONPATH=src python benchmarks/attention.py [--quick] [--out DIR] [--backends cuda,triton]

For every shape (Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128; SmolLM2: 9/3/64), batch
{1, 8, 32} x context {4k, 32k} x sparsity {0.5, 0.7}, fp16, one query token, a dense local window
of 32 tokens after the compressed ones:

- dense: ``F.scaled_dot_product_attention`` with the default backend on dense random K/V of the same
  total length (never the pruned tensors, never zeros), GQA through ``enable_gqa``;
- ours: :func:`mustafar.sparse_decode_attention` per backend; bytes = compressed values + bitmaps +
  window + query + output; floor = bytes / the measured read bandwidth;
- compress: the prune + compress kernel on ``[batch, kv_heads, 4096, head_dim]`` rows.

Times are medians of ``triton.testing.do_bench`` (CUDA events) over a rotation of input sets larger
than the L2 cache, and of CUDA-graph replays (``graph`` columns) where launch overhead matters.
Writes ``attention.json`` (and prints a table) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mustafar.format import BitmapKV, bytes_per_token
from mustafar.ops import compress_into, sparse_decode_attention
from mustafar.reference import compress_reference

SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2-135m": (9, 3, 64)}
WINDOW = 32
L2_BYTES = 60 << 20
ROTATE_BYTES = 4 * L2_BYTES


def read_bandwidth() -> tuple[float, float]:
    """(device-to-device copy rate counting read+write, plain read rate via a sum), bytes/s."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.float16)  # 2 GiB
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") * 1e-3
    t_sum = do_bench(lambda: src.sum(dtype=torch.float32), warmup=50, rep=300, return_mode="median") * 1e-3
    return 2 * src.numel() * 2 / t_copy, src.numel() * 2 / t_sum


def graph_time(fn, calls: int = 20) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return do_bench(graph.replay, warmup=20, rep=200, return_mode="median") * 1e-3 / calls


def rotating(make, one_set_bytes: int):
    """Enough independent input sets to exceed the L2 cache several times; returns (sets, cycling fn)."""
    count = max(1, min(16, ROTATE_BYTES // max(one_set_bytes, 1)))
    sets = [make() for _ in range(count)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % count
        return sets[state["i"]]

    return sets, next_set


def time_dense(name, batch, context):
    """(eager, graph) seconds of default-backend SDPA on dense random K/V of ``context`` tokens."""
    hq, hkv, d = SHAPES[name]

    def make():
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, hkv, context, d, device="cuda", dtype=torch.float16)
        v = torch.randn(batch, hkv, context, d, device="cuda", dtype=torch.float16)
        return q, k, v

    sets, next_set = rotating(make, 2 * batch * hkv * context * d * 2)
    eager = do_bench(lambda: F.scaled_dot_product_attention(*next_set(), enable_gqa=True), warmup=25, rep=200,
                     return_mode="median") * 1e-3
    graph = graph_time(lambda: F.scaled_dot_product_attention(*sets[0], enable_gqa=True))
    return eager, graph


def time_sparse(name, batch, context, sparsity, backends, check):
    """Per backend: (eager seconds, graph seconds, relative error vs the reference or None)."""
    hq, hkv, d = SHAPES[name]
    n_comp = context - WINDOW

    def make():
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
        stores = []
        for _ in range(2):
            store = BitmapKV.empty(batch, hkv, d, sparsity, torch.float16, "cuda", capacity=n_comp)
            store.append(torch.randn(batch, hkv, n_comp, d, device="cuda", dtype=torch.float16))
            stores.append(store)
        kw = torch.randn(batch, hkv, WINDOW, d, device="cuda", dtype=torch.float16)
        vw = torch.randn(batch, hkv, WINDOW, d, device="cuda", dtype=torch.float16)
        return q, stores[0], stores[1], kw, vw

    sets, next_set = rotating(make, batch * hkv * n_comp * 2 * bytes_per_token(d, sparsity))
    results = {}
    for backend in backends:
        eager = do_bench(lambda b=backend: sparse_decode_attention(*next_set(), backend=b), warmup=25, rep=200,
                         return_mode="median") * 1e-3
        graph = graph_time(lambda b=backend: sparse_decode_attention(*sets[0], backend=b))
        err = None
        if check:
            out = sparse_decode_attention(*sets[0], backend=backend)
            ref = sparse_decode_attention(*sets[0], backend="torch")
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        results[backend] = (eager, graph, err)
    return results


def bench_case(name, batch, context, sparsity, backends, read_bw, check):
    hq, hkv, d = SHAPES[name]
    n_comp = context - WINDOW
    dense_bytes = 2 * batch * hkv * context * d * 2
    total_bytes = (batch * hkv * n_comp * 2 * bytes_per_token(d, sparsity) + 2 * batch * hkv * WINDOW * d * 2
                   + 2 * batch * hq * d * 2)
    t_dense, t_dense_graph = time_dense(name, batch, context)
    torch.cuda.empty_cache()
    row = dict(shape=name, batch=batch, context=context, sparsity=sparsity, dense_us=t_dense * 1e6,
               dense_graph_us=t_dense_graph * 1e6, bytes=total_bytes, dense_bytes=dense_bytes,
               floor_us=total_bytes / read_bw * 1e6, dense_floor_us=dense_bytes / read_bw * 1e6)
    for backend, (t, tg, err) in time_sparse(name, batch, context, sparsity, backends, check).items():
        row[f"{backend}_us"] = t * 1e6
        row[f"{backend}_graph_us"] = tg * 1e6
        row[f"{backend}_speedup"] = t_dense / t
        row[f"{backend}_graph_speedup"] = t_dense_graph / tg
        row[f"{backend}_bw_tbs"] = total_bytes / tg / 1e12
        row[f"{backend}_over_floor"] = tg / (total_bytes / read_bw)
        if err is not None:
            row[f"{backend}_rel_err"] = err
    torch.cuda.empty_cache()
    return row


def bench_compress(name, batch, sparsity, backends, read_bw, tokens=4096):
    _, hkv, d = SHAPES[name]
    dtype = torch.float16
    in_bytes = batch * hkv * tokens * d * 2
    out_bytes = batch * hkv * tokens * bytes_per_token(d, sparsity, dtype)

    def make():
        x = torch.randn(batch, hkv, tokens, d, device="cuda", dtype=dtype)
        store = BitmapKV.empty(batch, hkv, d, sparsity, dtype, "cuda", capacity=tokens)
        return x, store

    sets, next_set = rotating(make, in_bytes + out_bytes)
    row = dict(shape=name, batch=batch, tokens=tokens, sparsity=sparsity, read_bytes=in_bytes,
               write_bytes=out_bytes)
    for backend in backends:
        def fn(b=backend):
            x, store = next_set()
            compress_into(x, sparsity, *store.storage, 0, backend=b)
        t = do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3
        row[f"{backend}_us"] = t * 1e6
        row[f"{backend}_read_fraction"] = in_bytes / t / read_bw
        x, store = sets[0]
        compress_into(x, sparsity, *store.storage, 0, backend=backend)
        ref_v, ref_b = compress_reference(x, sparsity)
        values, bitmaps = store.storage
        row[f"{backend}_exact"] = bool(torch.equal(values[:, :, :tokens], ref_v)
                                       and torch.equal(bitmaps[:, :, :tokens], ref_b))
    return row


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))


def write_records(out_dir: str, filename: str, records: list) -> None:
    """``{"environment": ..., "records": records}`` as JSON in ``out_dir/filename`` (the probes' result files)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, filename), "w") as f:
        json.dump({"environment": environment(), "records": records}, f, indent=1)


def print_table(rows, backends):
    cols = ["shape", "batch", "context", "sparsity", "dense_us", "dense_graph_us", "floor_us"]
    for b in backends:
        cols += [f"{b}_us", f"{b}_graph_us", f"{b}_graph_speedup", f"{b}_over_floor", f"{b}_bw_tbs"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, float('nan')):.3g}" if isinstance(r.get(c), float) else str(r.get(c))
                         for c in cols))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the Llama shape at 32k")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--check", action="store_true", help="also compare each backend with the reference")
    parser.add_argument("--shapes", default="llama3-8b,smollm2-135m")
    args = parser.parse_args()
    backends = args.backends.split(",")
    env = environment()
    copy_bw, read_bw = read_bandwidth()
    env.update(copy_bw_tbs=copy_bw / 1e12, read_bw_tbs=read_bw / 1e12)
    print(json.dumps(env), flush=True)
    rows, comp_rows = [], []
    batches, contexts = ((8,), (32768,)) if args.quick else ((8, 32, 1), (32768, 4096))
    for name in args.shapes.split(","):
        for sparsity in (0.5, 0.7):
            comp = bench_compress(name, 32, sparsity, backends, read_bw)
            print(json.dumps(comp), flush=True)
            comp_rows.append(comp)
        for context in contexts:
            for batch in batches:
                for sparsity in (0.7, 0.5):
                    row = bench_case(name, batch, context, sparsity, backends, read_bw, args.check)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(dict(environment=env, attention=rows, compress=comp_rows), f, indent=1)
    print_table(rows, backends)


if __name__ == "__main__":
    main()
