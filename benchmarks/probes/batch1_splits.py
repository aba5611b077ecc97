"""Probe for issue 14 item 4 / issue 13 (batch 1): the CUDA decode's time against its split count at small batch.

Not part of the library; written 2026-12-03 (fifth session) after the device time was spent, so not yet run. Why:
at 1 x 4k the sparse graph step's attention took 0.62 ms against dense's 0.34 ms (32 layers: 19 vs 11 us a
layer; BENCHMARKS.md, e2e-fair rows of 2026-12-03), while at 8 x 32k the kernel is 1.3x faster than dense. The
launcher (:func:`mustafar.launch.cuda.decode_attention_cuda`) picks the splits that fill one wave of CTAs
(:func:`mustafar.launch.common.wave_splits`): at 1 x 4k that is 64 splits of one 64-token tile each, every CTA
paying its set-up (query fragments, bitmap prefixes, pipeline fill) for one tile, and a merge over 65 parts.
This sweeps ``num_splits`` to find whether fewer, longer CTAs win at small batch x context.

Usage (GPU, repository root; about a minute)::

    PYTHONPATH=src python benchmarks/probes/batch1_splits.py [--out DIR]

Per case (Llama-3-8B shape: 8 KV heads, GQA group 4, head_dim 128, fp16, a dense window of 32 tokens): the
relative error of each split count against the PyTorch reference, then graph-replay medians (input sets rotated
past the L2) of the library's choice (``auto``) and of each count, and dense SDPA (default backend, dense random
K/V of the same length) in the same run. One JSON line per case; ``batch1_splits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from attention import graph_time, rotating, time_dense, write_records  # noqa: E402

from mustafar import compress  # noqa: E402
from mustafar.format import bytes_per_token  # noqa: E402
from mustafar.launch.cuda import CTA_TOKENS, decode_attention_cuda  # noqa: E402
from mustafar.ops import sparse_decode_attention  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM, WINDOW = 8, 4, 128, 32
CASES = [(1, 4096, 0.7), (1, 4096, 0.5), (1, 32768, 0.7), (1, 32768, 0.5), (8, 4096, 0.7)]
SPLITS = [None, 2, 4, 8, 16, 32, 64, 128, 256]


def make(batch, context, sparsity):
    """(query, K store, V store, K window, V window) of random fp16 data."""
    rand = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16)  # noqa: E731
    n = context - WINDOW
    return (rand(batch, KV_HEADS * GROUP, 1, HEAD_DIM), compress(rand(batch, KV_HEADS, n, HEAD_DIM), sparsity),
            compress(rand(batch, KV_HEADS, n, HEAD_DIM), sparsity), rand(batch, KV_HEADS, WINDOW, HEAD_DIM),
            rand(batch, KV_HEADS, WINDOW, HEAD_DIM))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    records = []
    for batch, context, sparsity in CASES:
        one_set = 2 * batch * KV_HEADS * context * bytes_per_token(HEAD_DIM, sparsity, torch.float16)
        sets, next_set = rotating(lambda: make(batch, context, sparsity), one_set)
        q, ks, vs, kw, vw = sets[0]
        reference = sparse_decode_attention(q, ks, vs, kw, vw, backend="torch").double()
        blocks = -(-ks.tokens // CTA_TOKENS)
        record = {"batch": batch, "context": context, "sparsity": sparsity, "blocks_of_64": blocks, "us": {},
                  "rel_err": {}}
        for splits in SPLITS:
            if splits is not None and splits > blocks:
                continue
            name = "auto" if splits is None else str(splits)
            out = decode_attention_cuda(q, ks, vs, kw, vw, HEAD_DIM ** -0.5, num_splits=splits).double()
            record["rel_err"][name] = ((out - reference).norm() / reference.norm()).item()

            def call(splits=splits):
                decode_attention_cuda(*next_set(), HEAD_DIM ** -0.5, num_splits=splits)

            record["us"][name] = graph_time(call) * 1e6
        record["dense_us"] = time_dense("llama3-8b", batch, context)[1] * 1e6
        best = min(record["us"], key=record["us"].get)
        record["best"] = best
        record["speedup_auto"] = record["dense_us"] / record["us"]["auto"]
        record["speedup_best"] = record["dense_us"] / record["us"][best]
        print(json.dumps(record), flush=True)
        records.append(record)
    write_records(args.out, "batch1_splits.json", records)


if __name__ == "__main__":
    main()
