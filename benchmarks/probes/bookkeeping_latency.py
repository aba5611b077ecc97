"""Probe for issue 14 item 4 (batch 1): the fused decode bookkeeping launch and variants of its launch shape.

Not part of the library; written 2026-12-03 (fifth session) after the device time was spent, so not yet run on a
GPU. Why: at 1 x 32k and 1 x 4k the sparse graph step pays 0.18-0.19 ms of bookkeeping per step (32 layers,
about 6 us a launch) against 0.05 ms for the dense cache's in-place write (BENCHMARKS.md, e2e-fair rows of
2026-12-03). At 1 x 32k that is 0.13 of the 0.16 ms by which the sparse step is slower (0.98x). The kernel
(:mod:`mustafar.kernels.bookkeeping`) selects the kept entries of each row by a 15-step bisection, one row
reduction per step, for K and then for V, in programs of 4 warps over 4 rows: about 30 dependent reductions,
each across warps.

Variants, all the library's kernel source (so the stores are bit-identical by construction; checked first):

- ``lib``: :func:`mustafar.launch.bookkeeping.fused_bookkeeping` as it launches today (``BLOCK_R`` 4, 4 warps).
- ``rR-wW``: ``BLOCK_R`` = R rows per program and W warps (``r1-w1``: a row's reductions inside one warp).
- ``...-kv``: ``KV_SPLIT=1``, K and V in two grid columns (half the dependent reductions per program).
- ``dense-write``: the dense cache's one-launch write (:func:`mustafar.launch.dense_write.dense_write`), the
  dense side's bookkeeping in the e2e rows.

Usage (repository root)::

    PYTHONPATH=src python benchmarks/probes/bookkeeping_latency.py [--out DIR]          # GPU: check + time
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/probes/bookkeeping_latency.py --check-only  # CPU

Timing: CUDA graphs of 32 launches (one per layer of Llama-3-8B, each on its own layer state), medians, us per
launch, at batch 1, 16 and 24 (8 KV heads, head_dim 128, window 32, 32k tokens held, fp16, K0.7V0.7 and
K0.7V0.7-fp8). Prints one JSON line per case and writes ``bookkeeping_latency.json``. Reading: a variant that
is bit-identical and faster than ``lib`` at every batch can replace the launcher's shape (``BLOCK_ROWS``,
``num_warps``, ``KV_SPLIT``); then rerun the e2e rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mustafar.format import BitmapKV  # noqa: E402
from mustafar.fp8 import FP8_DTYPE  # noqa: E402
from mustafar.kernels.bookkeeping import bookkeeping_kernel  # noqa: E402
from mustafar.launch.bookkeeping import bookkeeping_args, fused_bookkeeping  # noqa: E402
from mustafar.launch.common import cdiv, next_pow2  # noqa: E402

#: name -> (rows per program, warps, KV_SPLIT); "lib" launches through the library's launcher.
VARIANTS = {
    "lib": None,
    "r4-w4-kv": (4, 4, 1),
    "r2-w2": (2, 2, 0),
    "r2-w2-kv": (2, 2, 1),
    "r1-w1": (1, 1, 0),
    "r1-w1-kv": (1, 1, 1),
    "r1-w2-kv": (1, 2, 1),
}
LAYERS = 32


def make_state(batch, kv_heads, head_dim, window, held, sparsity, dtype, kept_dtype, device, seed=0, fill=True):
    """One layer's operands: the new token, the rings, the stores (capacity ``held``; random bytes with ``fill``,
    else as allocated), length and counter."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    stores = [BitmapKV.empty(batch, kv_heads, head_dim, sparsity, dtype, device, capacity=held,
                             kept_dtype=kept_dtype) for _ in range(2)]
    for store in stores if fill else ():  # random bytes for the check; the timing does not depend on them
        for buffer in (*store.storage, *((store.scale_storage,) if store.is_fp8 else ())):
            buffer.view(torch.uint8).copy_(torch.randint(0, 256, buffer.view(torch.uint8).shape, generator=gen))
    return dict(key_states=rand(batch, kv_heads, 1, head_dim), value_states=rand(batch, kv_heads, 1, head_dim),
                key_ring=rand(batch, kv_heads, window, head_dim), value_ring=rand(batch, kv_heads, window, head_dim),
                key_store=stores[0], value_store=stores[1],
                length=torch.tensor([held + window - 2], dtype=torch.int64, device=device),
                counter=torch.zeros(1, dtype=torch.int32, device=device))


def buffers(state) -> list[torch.Tensor]:
    """Every tensor the launch writes (rings, stores, scales, length, counter)."""
    out = [state["key_ring"], state["value_ring"], state["length"], state["counter"]]
    for store in (state["key_store"], state["value_store"]):
        out += [*store.storage, *((store.scale_storage,) if store.is_fp8 else ())]
    return out


def clone_state(state):
    """A deep copy of ``state`` (stores included)."""
    copy = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    for name in ("key_store", "value_store"):
        store = state[name]
        twin = BitmapKV.empty(*store.shape[:2], store.head_dim, store.sparsity, store.dtype, store.device,
                              capacity=store.capacity, kept_dtype=store.kept_dtype)
        for dst, src in zip(twin.storage, store.storage):
            dst.copy_(src)
        if store.is_fp8:
            twin.scale_storage.copy_(store.scale_storage)
        copy[name] = twin
    return copy


def launch(name: str, state, advance: bool) -> None:
    """One bookkeeping launch of variant ``name`` on ``state``."""
    if VARIANTS[name] is None:
        fused_bookkeeping(**state, advance=advance)
        return
    block, warps, split = VARIANTS[name]
    rows, args, constexprs = bookkeeping_args(**state, advance=advance)
    block = min(block, next_pow2(rows))
    bookkeeping_kernel[(cdiv(rows, block), 2 if split else 1)](*args, **constexprs, BLOCK_R=block, KV_SPLIT=split,
                                                               num_warps=warps)


def check(batch, kv_heads, head_dim, window, held, sparsity, dtype, kept_dtype, device) -> dict:
    """Each variant's written tensors after two launches (store rows ``held - 2`` and ``held - 1`` evicted) equal
    ``lib``'s, byte for byte."""
    base = make_state(batch, kv_heads, head_dim, window, held, sparsity, dtype, kept_dtype, device)
    results = {}
    for name in VARIANTS:
        state = clone_state(base)
        for step in range(2):
            state["key_states"] = base["key_states"] + step
            state["value_states"] = base["value_states"] - step
            launch(name, state, advance=True)
        results[name] = [t.view(torch.uint8).cpu() if t.dtype.itemsize == 1 or t.dtype.is_floating_point
                         else t.cpu() for t in buffers(state)]
    return {name: all(torch.equal(a, b) for a, b in zip(results["lib"], got)) for name, got in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--check-only", action="store_true", help="the bit-exactness checks only (CPU: interpreter)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for kept in (None, FP8_DTYPE):
        for batch, kv_heads, head_dim in ((1, 8, 128), (3, 2, 64)):
            same = check(batch, kv_heads, head_dim, 8, 40, 0.7, torch.float16, kept, device)
            record = {"check": True, "batch": batch, "kv_heads": kv_heads, "head_dim": head_dim,
                      "kept": "fp8" if kept else "fp16", "identical": same}
            print(json.dumps(record), flush=True)
            records.append(record)
    if not all(all(r["identical"].values()) for r in records):
        print("a variant differs from lib: not timed", flush=True)
        sys.exit(1)
    if args.check_only or device != "cuda":
        return
    from attention import graph_time, write_records

    from mustafar.launch.dense_write import dense_write

    for kept in (None, FP8_DTYPE):
        for batch in (1, 16, 24):
            states = [make_state(batch, 8, 128, 32, 32768, 0.7, torch.float16, kept, device, seed=i, fill=False)
                      for i in range(LAYERS)]
            record = {"batch": batch, "kv_heads": 8, "head_dim": 128, "window": 32, "held": 32768,
                      "setting": "K0.7V0.7-fp8" if kept else "K0.7V0.7", "us_per_launch": {}}
            for name in VARIANTS:
                record["us_per_launch"][name] = graph_time(
                    lambda: [launch(name, s, advance=False) for s in states], calls=1) * 1e6 / LAYERS
            dense = [(torch.randn(batch, 8, 32800, 128, device=device, dtype=torch.float16),
                      torch.randn(batch, 8, 32800, 128, device=device, dtype=torch.float16)) for _ in range(4)]
            s0 = states[0]
            record["us_per_launch"]["dense-write"] = graph_time(
                lambda: [dense_write(*dense[i % 4], s0["key_states"], s0["value_states"], s0["length"],
                                     s0["counter"], advance=False) for i in range(LAYERS)], calls=1) * 1e6 / LAYERS
            print(json.dumps(record), flush=True)
            records.append(record)
    write_records(args.out, "bookkeeping_latency.json", records)


if __name__ == "__main__":
    main()
