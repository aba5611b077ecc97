"""Probe for issue 13: time the SIMT K side (``k_simt.cu``) against the library's whole CUDA decode and dense SDPA.

Not part of the library; written 2026-12-03 and not yet run (no device time was left). Usage (CUDA machine,
repository root, about a minute with the build):

    PYTHONPATH=src python benchmarks/probes/k_simt.py [--out DIR]

For each case (Llama-3-8B shape: 8 KV heads, GQA group 4, head_dim 128, fp16): checks the probe's scores
against ``decompress(K) @ q`` (relative error), then times with CUDA graphs (20 calls per graph, medians, input
sets rotated past the L2) the probe (K side only: scores, no softmax, no V), the library's CUDA decode (K and
V, no window) and dense SDPA (default backend, ``enable_gqa``, dense random K/V). Prints one JSON line per
case and writes ``k_simt.json``. Reading: if ``probe_us`` is well under half of ``library_us`` and near
``k_floor_us``, a kernel with this K side and an mma V side is worth building (KERNELS.md's budget).
Two query-table variants: fp16 (``probe_us``: 8-byte gathers and conversions) and fp32 (``probe_q_f32_us``:
16-byte gathers, no conversion).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from attention import environment, graph_time, read_bandwidth, rotating  # noqa: E402

from mustafar import compress  # noqa: E402
from mustafar.format import bytes_per_token  # noqa: E402
from mustafar.ops import sparse_decode_attention  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128
CASES = [(8, 32768, 0.7), (8, 32768, 0.5), (32, 32768, 0.7), (1, 32768, 0.7)]

_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
int k_scores_simt_launch(const void* values, const void* bits, const void* q, float* out, int bh, int tokens,
                         int k_keep, int group, float scale, bool q_f32, cudaStream_t stream);
void scores(const torch::Tensor& values, const torch::Tensor& bits, const torch::Tensor& q, torch::Tensor& out,
            double scale, bool q_f32) {
  const int err = k_scores_simt_launch(values.data_ptr(), bits.data_ptr(), q.data_ptr(), out.data_ptr<float>(),
                                       values.size(0), values.size(1), values.size(2), q.size(1),
                                       static_cast<float>(scale), q_f32,
                                       c10::cuda::getCurrentCUDAStream(values.get_device()).stream());
  TORCH_CHECK(err == 0, "k_scores_simt failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("scores", &scores); }
"""


def build():
    """Compile the probe (cached in TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load_inline

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}a" if major >= 9 else f"{major}{minor}"
    with open(os.path.join(HERE, "k_simt.cu")) as f:
        cuda_source = f.read()
    return load_inline(name="mustafar_probe_k_simt", cpp_sources=_CPP, cuda_sources=cuda_source,
                       extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                          "-lineinfo"])


def make_case(batch, tokens, sparsity):
    """A maker of ``(q [B, Hq, 1, D], keys, values)`` stores of random fp16 rows (the CUDA compress)."""

    def make():
        q = torch.randn(batch, KV_HEADS * GROUP, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
        keys, values = (compress(torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, device="cuda",
                                             dtype=torch.float16), sparsity) for _ in range(2))
        return q, keys, values

    return make


def probe_inputs(q, keys):
    """``(values [BH, T, k_keep], bits int32 [BH, T, 4], q [BH, G, D], out [BH, G, T])`` views for the probe."""
    batch, _, tokens, k_keep = keys.values.shape
    values = keys.values.reshape(batch * KV_HEADS, tokens, k_keep)
    bits = keys.bitmaps.reshape(batch * KV_HEADS, tokens, -1).view(torch.int32)
    qg = q.reshape(batch * KV_HEADS, GROUP, HEAD_DIM)
    out = torch.empty(batch * KV_HEADS, GROUP, tokens, device="cuda", dtype=torch.float32)
    return values, bits, qg, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    ext = build()
    env = environment()
    _, read_bw = read_bandwidth()
    env["read_bw_tbs"] = read_bw / 1e12
    print(json.dumps(env), flush=True)
    scale = HEAD_DIM ** -0.5
    rows = []
    for batch, tokens, sparsity in CASES:
        k_bytes = batch * KV_HEADS * tokens * bytes_per_token(HEAD_DIM, sparsity, torch.float16)
        sets, _ = rotating(make_case(batch, tokens, sparsity), 2 * k_bytes)
        q, keys, values = sets[0]
        pv, pb, pq, out = probe_inputs(q, keys)
        dense_k = keys.decompress().reshape(batch * KV_HEADS, tokens, HEAD_DIM).float()
        ref = torch.einsum("bgd,btd->bgt", pq.float(), dense_k) * scale
        rel_err = {}
        for q_f32 in (False, True):
            out.zero_()
            ext.scores(pv, pb, pq, out, scale, q_f32)
            rel_err[q_f32] = ((out - ref).norm() / ref.norm()).item()
        del dense_k, ref
        inputs = [probe_inputs(*s[:2]) for s in sets]
        state = {"i": 0}

        def probe(q_f32):
            state["i"] = (state["i"] + 1) % len(inputs)
            ext.scores(*inputs[state["i"]], scale, q_f32)

        def library():
            state["i"] = (state["i"] + 1) % len(sets)
            return sparse_decode_attention(*sets[state["i"]], backend="cuda")

        kd = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.float16)
        vd = torch.randn_like(kd)
        row = dict(batch=batch, tokens=tokens, sparsity=sparsity, group=GROUP, rel_err=rel_err[False],
                   rel_err_q_f32=rel_err[True], k_floor_us=k_bytes / read_bw * 1e6,
                   probe_us=graph_time(lambda: probe(False)) * 1e6,
                   probe_q_f32_us=graph_time(lambda: probe(True)) * 1e6,
                   library_us=graph_time(library) * 1e6,
                   dense_us=graph_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                       q, kd, vd, enable_gqa=True)) * 1e6)
        row["probe_over_library"] = row["probe_us"] / row["library_us"]
        row["probe_q_f32_over_library"] = row["probe_q_f32_us"] / row["library_us"]
        row["probe_over_k_floor"] = row["probe_us"] / row["k_floor_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del sets, inputs, kd, vd
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "k_simt.json"), "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
