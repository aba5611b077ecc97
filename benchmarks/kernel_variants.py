"""A/B timing of CUDA decode-kernel variants against dense SDPA, for kernel tuning on one GPU.

Usage (CUDA machine, repository root):

    PYTHONPATH=src python benchmarks/kernel_variants.py --variant new= --variant s3=-DMUSTAFAR_DECODE_STAGES=3 \
        --variant head=@HEAD [--cases quick|full|fp8|pad|bulk] [--triton] [--out DIR]

Each ``--variant NAME=SPEC`` builds the extension once: SPEC is ``lib`` (the library's own build, as
``backend="cuda"`` loads it), a space-separated list of nvcc flags for the working tree's
``src/mustafar/csrc``, or ``@REV`` for the csrc of a git revision (e.g. ``@HEAD`` for the committed kernel). Builds run in parallel processes. Every variant then serves
:func:`mustafar.sparse_decode_attention` with ``backend="cuda"`` in turn; each case reports the graph-replay
median (20 calls per graph, as ``benchmarks/attention.py``), the speed-up over dense SDPA (default backend,
``enable_gqa``, dense random K/V of the same length) measured in the same run, the byte floor and the relative
error against the PyTorch reference. Writes ``kernel_variants.json`` to ``--out``.

``--cases fp8`` times FP8 kept values (issue 15; dtype ``fp16+fp8``: an fp16 cache whose kept values are e4m3
with a scale per token-head) next to the same cases in the cache dtype; variants that cannot read FP8 (builds
before issue 15's kernel) get no figure there. ``--triton`` adds the Triton kernel as one more column. Each row
also gives ``dense_fp8_floor_us``: the byte floor of a dense FP8 cache of the same length (what a dense FP8
kernel could reach at best).
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
FP8_CASES = [(shape, batch, context, sparsity, dtype) for shape, batch, context, sparsity in
             (("llama3-8b", 8, 32768, 0.7), ("llama3-8b", 32, 32768, 0.7), ("llama3-8b", 8, 32768, 0.5),
              ("llama3-8b", 32, 32768, 0.5), ("llama3-8b", 1, 32768, 0.7), ("llama3-8b", 16, 32768, 0.7))
             for dtype in ("fp16", "fp16+fp8")] + [("llama3-8b", 8, 32768, 0.7, "bf16+fp8")]
#: Rows whose staged values are a power of two of bytes (``MUSTAFAR_DECODE_PAD``): s = 0.5 at head_dim 128 (fp16:
#: 128-byte rows, FP8: 64) and 64 (fp16: 64), with an s = 0.7 row (38 values: never padded) as the control.
PAD_CASES = [("llama3-8b", 8, 32768, 0.5, "fp16"), ("llama3-8b", 32, 32768, 0.5, "fp16"),
             ("llama3-8b", 1, 32768, 0.5, "fp16"), ("llama3-8b", 8, 32768, 0.5, "bf16"),
             ("llama3-8b", 8, 32768, 0.5, "fp16+fp8"), ("smollm2-135m", 8, 32768, 0.5, "fp16"),
             ("qwen2.5-7b", 8, 32768, 0.5, "fp16"), ("llama3-8b", 8, 32768, 0.7, "fp16")]
#: Tile staging by the bulk-copy engine (``MUSTAFAR_DECODE_BULK``): batch 8 and 32, s = 0.5 (padded rows) and 0.7,
#: FP8, batch 1, 8 x 4k and head_dim 64.
BULK_CASES = [("llama3-8b", 8, 32768, 0.7, "fp16"), ("llama3-8b", 32, 32768, 0.7, "fp16"),
              ("llama3-8b", 8, 32768, 0.5, "fp16"), ("llama3-8b", 32, 32768, 0.5, "fp16"),
              ("llama3-8b", 1, 32768, 0.7, "fp16"), ("llama3-8b", 8, 4096, 0.7, "fp16"),
              ("llama3-8b", 8, 32768, 0.7, "fp16+fp8"), ("llama3-8b", 8, 32768, 0.5, "fp16+fp8"),
              ("smollm2-135m", 8, 32768, 0.7, "fp16")]
CASES = {"quick": QUICK, "full": FULL, "fp8": FP8_CASES, "pad": PAD_CASES, "bulk": BULK_CASES}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """``"fp16"`` / ``"bf16"`` (kept values in the cache dtype) or ``"fp16+fp8"`` / ``"bf16+fp8"`` (FP8 kept)."""
    cache, _, kept = name.partition("+")
    return _DTYPES[cache], (torch.float8_e4m3fn if kept == "fp8" else None)


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


class _Compat:
    """An older build's binding under today's launcher: older occupancy calls take fewer arguments (one k_keep
    before per-K/V row sizes, commit 7839734 and older; no FP8 flag before issue 15's kernel) and older decode
    calls no FP8 scales (the benchmark's stores are never FP8 for them)."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def occupancy(self, bf16, head_dim, rows, masked, k_keep, v_keep, fp8=False):
        head = (bf16, head_dim, rows, masked)
        for args in ((*head, k_keep, v_keep, fp8), (*head, k_keep, v_keep), (*head, max(k_keep, v_keep))):
            try:
                return self._ext.occupancy(*args)
            except TypeError:
                continue
        raise TypeError("the variant's occupancy() takes none of the known argument lists")

    def decode(self, *args):
        try:
            return self._ext.decode(*args)
        except TypeError:
            return self._ext.decode(*args[:-2])  # a build without the FP8 scale arguments


def use_variant(ext) -> None:
    """Make the ops layer's CUDA backend run ``ext`` (K and V of one sparsity: old builds stage one row size)."""
    cuda_launch.load_extension = lambda: _Compat(ext)
    cuda_launch.ctas_per_sm.cache_clear()


def make_case(shape, batch, context, sparsity, dtype, kept_dtype=None):
    """(a maker of random ``(query, key store, value store, key window, value window)``, bytes one call reads)."""
    hq, hkv, d = SHAPES[shape]
    n_comp = context - WINDOW

    def make():
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=dtype)
        stores = []
        for _ in range(2):
            store = BitmapKV.empty(batch, hkv, d, sparsity, dtype, "cuda", capacity=n_comp, kept_dtype=kept_dtype)
            store.append(torch.randn(batch, hkv, n_comp, d, device="cuda", dtype=dtype))
            stores.append(store)
        kw = torch.randn(batch, hkv, WINDOW, d, device="cuda", dtype=dtype)
        vw = torch.randn(batch, hkv, WINDOW, d, device="cuda", dtype=dtype)
        return q, stores[0], stores[1], kw, vw

    nbytes = (batch * hkv * n_comp * 2 * bytes_per_token(d, sparsity, dtype, kept_dtype)
              + 2 * batch * hkv * WINDOW * d * 2 + 2 * batch * hq * d * 2)
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
    parser.add_argument("--cases", choices=tuple(CASES), default="full")
    parser.add_argument("--triton", action="store_true", help="also time the Triton kernel")
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
    backends = {name: "cuda" for name in exts} | ({"triton": "triton"} if args.triton else {})
    for shape, batch, context, sparsity, dtype_name in CASES[args.cases]:
        dtype, kept_dtype = parse_dtype(dtype_name)
        hq, hkv, d = SHAPES[shape]
        row = dict(shape=shape, batch=batch, context=context, sparsity=sparsity, dtype=dtype_name,
                   dense_us=dense_time(shape, batch, context, dtype) * 1e6,
                   dense_fp8_floor_us=(2 * batch * hkv * context * d + 2 * batch * hq * d * 2) / read_bw * 1e6)
        make, nbytes = make_case(shape, batch, context, sparsity, dtype, kept_dtype)
        sets, _ = rotating(make, nbytes)
        row.update(bytes=nbytes, floor_us=nbytes / read_bw * 1e6)
        ref = sparse_decode_attention(*sets[0], backend="torch").float()
        for name, backend in backends.items():
            if backend == "cuda":
                use_variant(exts[name])
            state = {"i": 0}

            def call():
                state["i"] = (state["i"] + 1) % len(sets)
                return sparse_decode_attention(*sets[state["i"]], backend=backend)

            try:
                t = graph_time(call) * 1e6
            except Exception as error:  # a variant without FP8 support: no figure for it in this row
                print(f"{name} on {dtype_name}: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
                continue
            out = sparse_decode_attention(*sets[0], backend=backend).float()
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
    names = list(backends)
    print("shape batch ctx s dtype dense_us floor_us " + " ".join(f"{n}_us {n}_x {n}_floor" for n in names))
    for r in rows:
        cells = [r["shape"], r["batch"], r["context"], r["sparsity"], r["dtype"], f"{r['dense_us']:.1f}",
                 f"{r['floor_us']:.1f}"]
        for n in names:
            if f"{n}_us" not in r:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{r[f'{n}_us']:.1f}", f"{r[f'{n}_speedup']:.2f}", f"{r[f'{n}_over_floor']:.2f}"]
        print(" ".join(str(c) for c in cells))


if __name__ == "__main__":
    main()
