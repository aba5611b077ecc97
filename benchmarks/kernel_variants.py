"""A/B timing of CUDA decode-kernel variants against dense SDPA, for kernel tuning on one GPU.

Usage (CUDA machine, repository root):

    PYTHONPATH=src python benchmarks/kernel_variants.py --variant new= --variant s3=-DMUSTAFAR_DECODE_STAGES=3 \
        --variant head=@HEAD [--cases quick|full] [--out DIR]

Each ``--variant NAME=SPEC`` builds the extension once: SPEC is ``lib`` (the library's own build, as
``backend="cuda"`` loads it), a space-separated list of nvcc flags for the working tree's
``src/mustafar/csrc``, or ``@REV`` for the csrc of a git revision (e.g. ``@HEAD`` for the committed kernel). Builds run in parallel processes. Every variant then serves
:func:`mustafar.sparse_decode_attention` with ``backend="cuda"`` in turn; each case reports the graph-replay
median (20 calls per graph, as ``benchmarks/attention.py``), the speed-up over dense SDPA (default backend,
``enable_gqa``, dense random K/V of the same length) measured in the same run, the byte floor and the relative
error against the PyTorch reference. Writes ``kernel_variants.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import WINDOW, environment, graph_time, read_bandwidth, rotating  # noqa: E402

import mustafar.launch.cuda as cuda_launch  # noqa: E402
from mustafar.format import BitmapKV, bytes_per_token  # noqa: E402
from mustafar.ops import sparse_decode_attention  # noqa: E402

SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2-135m": (9, 3, 64)}
QUICK = [("llama3-8b", 8, 32768, 0.7, "fp16"), ("llama3-8b", 8, 32768, 0.5, "fp16"),
         ("llama3-8b", 1, 32768, 0.7, "fp16")]
FULL = QUICK + [("llama3-8b", 8, 32768, 0.9, "fp16"), ("llama3-8b", 32, 32768, 0.7, "fp16"),
                ("llama3-8b", 32, 32768, 0.5, "fp16"), ("llama3-8b", 16, 32768, 0.7, "fp16"),
                ("llama3-8b", 1, 32768, 0.5, "fp16"), ("llama3-8b", 1, 4096, 0.7, "fp16"),
                ("llama3-8b", 8, 4096, 0.7, "fp16"), ("llama3-8b", 8, 32768, 0.7, "bf16"),
                ("qwen2.5-7b", 8, 32768, 0.7, "fp16"), ("smollm2-135m", 8, 32768, 0.7, "fp16")]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build_source(spec: str, workdir: str) -> tuple[str, list[str]]:
    """(csrc directory, extra nvcc flags) of a variant SPEC."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "mustafar", "csrc")
    if not spec.startswith("@"):
        return here, spec.split()
    rev = spec[1:]
    dst = os.path.join(workdir, f"csrc-{rev.replace('/', '_')}")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(here):
        blob = subprocess.run(["git", "show", f"{rev}:src/mustafar/csrc/{name}"], capture_output=True, check=True)
        with open(os.path.join(dst, name), "wb") as f:
            f.write(blob.stdout)
    return dst, []


def load_variant(name: str, csrc: str, flags: list[str], verbose: bool = False):
    """Build (cached in ``TORCH_EXTENSIONS_DIR``) and import the extension of ``csrc`` with ``flags`` as ``name``."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}a" if major >= 9 else f"{major}{minor}"
    return load(name=f"mustafar_variant_{name}", verbose=verbose,
                sources=[os.path.join(csrc, f) for f in ("binding.cpp", "decode.cu", "compress.cu")],
                extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo",
                                   *flags],
                extra_include_paths=[csrc])


class _OldBinding:
    """A build from before per-K/V row sizes (commit 7839734 and older): its occupancy takes one k_keep."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def occupancy(self, bf16, head_dim, rows, masked, k_keep, v_keep):
        return self._ext.occupancy(bf16, head_dim, rows, masked, max(k_keep, v_keep))


def use_variant(ext) -> None:
    """Make the ops layer's CUDA backend run ``ext`` (K and V of one sparsity: old builds stage one row size)."""
    try:
        ext.occupancy(False, 128, 4, False, 39, 39)
    except TypeError:
        ext = _OldBinding(ext)
    cuda_launch.load_extension = lambda: ext
    cuda_launch.ctas_per_sm.cache_clear()


def make_case(shape, batch, context, sparsity, dtype):
    """(a maker of random ``(query, key store, value store, key window, value window)``, bytes one call reads)."""
    hq, hkv, d = SHAPES[shape]
    n_comp = context - WINDOW

    def make():
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=dtype)
        stores = []
        for _ in range(2):
            store = BitmapKV.empty(batch, hkv, d, sparsity, dtype, "cuda", capacity=n_comp)
            store.append(torch.randn(batch, hkv, n_comp, d, device="cuda", dtype=dtype))
            stores.append(store)
        kw = torch.randn(batch, hkv, WINDOW, d, device="cuda", dtype=dtype)
        vw = torch.randn(batch, hkv, WINDOW, d, device="cuda", dtype=dtype)
        return q, stores[0], stores[1], kw, vw

    nbytes = (batch * hkv * n_comp * 2 * bytes_per_token(d, sparsity, dtype) + 2 * batch * hkv * WINDOW * d * 2
              + 2 * batch * hq * d * 2)
    return make, nbytes


def dense_time(shape, batch, context, dtype) -> float:
    """Seconds per call of default-backend SDPA on dense random K/V of ``context`` tokens (graph replay)."""
    hq, hkv, d = SHAPES[shape]
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, hkv, context, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, hkv, context, d, device="cuda", dtype=dtype)
    t = graph_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    del q, k, v
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=SPEC (nvcc flags or @REV)")
    parser.add_argument("--cases", choices=("quick", "full"), default="full")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    workdir = tempfile.mkdtemp(prefix="mustafar-variants-")
    lib = cuda_launch.load_extension
    sources = {name: build_source(spec, workdir) for name, spec in variants.items() if spec != "lib"}
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r});"
                               f"import kernel_variants as k; k.load_variant({n!r}, {c!r}, {f!r})"])
             for n, (c, f) in sources.items()]
    if any(p.wait() for p in procs):
        raise SystemExit("a variant failed to build")
    exts = {name: lib() if spec == "lib" else load_variant(name, *sources[name]) for name, spec in variants.items()}
    print(f"built {list(exts)} in {time.time() - start:.0f} s", flush=True)
    env = environment()
    _, read_bw = read_bandwidth()
    env.update(read_bw_tbs=read_bw / 1e12, variants=variants)
    print(json.dumps(env), flush=True)
    rows = []
    for shape, batch, context, sparsity, dtype_name in (QUICK if args.cases == "quick" else FULL):
        dtype = _DTYPES[dtype_name]
        row = dict(shape=shape, batch=batch, context=context, sparsity=sparsity, dtype=dtype_name,
                   dense_us=dense_time(shape, batch, context, dtype) * 1e6)
        make, nbytes = make_case(shape, batch, context, sparsity, dtype)
        sets, _ = rotating(make, nbytes)
        row.update(bytes=nbytes, floor_us=nbytes / read_bw * 1e6)
        ref = sparse_decode_attention(*sets[0], backend="torch").float()
        for name, ext in exts.items():
            use_variant(ext)
            state = {"i": 0}

            def call():
                state["i"] = (state["i"] + 1) % len(sets)
                return sparse_decode_attention(*sets[state["i"]], backend="cuda")

            t = graph_time(call) * 1e6
            out = sparse_decode_attention(*sets[0], backend="cuda").float()
            row[f"{name}_us"] = t
            row[f"{name}_speedup"] = row["dense_us"] / t
            row[f"{name}_over_floor"] = t / row["floor_us"]
            row[f"{name}_rel_err"] = ((out - ref).norm() / ref.norm()).item()
        del sets
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_variants.json"), "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)
    names = list(exts)
    print("shape batch ctx s dtype dense_us floor_us " + " ".join(f"{n}_us {n}_x {n}_floor" for n in names))
    for r in rows:
        cells = [r["shape"], r["batch"], r["context"], r["sparsity"], r["dtype"], f"{r['dense_us']:.1f}",
                 f"{r['floor_us']:.1f}"]
        for n in names:
            cells += [f"{r[f'{n}_us']:.1f}", f"{r[f'{n}_speedup']:.2f}", f"{r[f'{n}_over_floor']:.2f}"]
        print(" ".join(str(c) for c in cells))


if __name__ == "__main__":
    main()
