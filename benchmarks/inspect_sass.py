"""Compile a Triton kernel of mustafar for sm_90a without a GPU and print its resource use and SASS mix.

Usage: python benchmarks/inspect_sass.py [decode|compress] [--dump FILE]
Runs on a CPU machine with triton installed (uses the ptxas/cuobjdump shipped with triton).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import types

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "mustafar")
# Import only mustafar.kernels (pure Triton), not the package's torch/transformers side.
_pkg = types.ModuleType("mustafar")
_pkg.__path__ = [_SRC]
sys.modules.setdefault("mustafar", _pkg)


def _aligned(fn, sig, names):
    """Triton's launch-time specialisation: pointers and strides divisible by 16."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n in sig}


def decode_source(d=128, rows=16, block_n=64, dtype="fp16"):
    from mustafar.kernels.decode import sparse_decode_kernel

    ptrs = ["Q", "KV", "KB", "VV", "VB", "KW", "VW", "MASK"]
    types = {"Q": f"*{dtype}", "KV": f"*{dtype}", "KB": "*i32", "VV": f"*{dtype}", "VB": "*i32",
             "KW": f"*{dtype}", "VW": f"*{dtype}", "MASK": "*i1", "OUT": "*fp32", "M_OUT": "*fp32", "L_OUT": "*fp32"}
    sig = {}
    for name in sparse_decode_kernel.arg_names:
        if name in types:
            sig[name] = types[name]
        elif name == "scale_log2e":
            sig[name] = "fp32"
        elif name.isupper() or name in ("D", "ROWS", "NG", "NW32", "BLOCK_N"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    consts = dict(D=d, ROWS=rows, NG=max(16, d // 4), NW32=2 * (-(-d // 64)), BLOCK_N=block_n, MASK_MODE=0,
                  PRECISION="tf32", INTERPRET=False)
    aligned = {n for n in sig if n.isupper() and sig[n].startswith("*")} | {
        n for n in sig if n.startswith("stride") and not n.endswith("t")}
    return ASTSource(fn=sparse_decode_kernel, signature=sig, constexprs=consts,
                     attrs=_aligned(sparse_decode_kernel, sig, aligned))


def compress_source(d=128, dtype="fp16"):
    from mustafar.kernels.compress import compress_kernel

    sig = {}
    for name in compress_kernel.arg_names:
        if name == "X" or name == "VALS":
            sig[name] = f"*{dtype}"
        elif name == "BITS":
            sig[name] = "*i32"
        elif name.isupper() or name in ("D", "DP", "NW32", "KEY_BITS", "BLOCK_R"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    consts = dict(D=d, DP=max(16, d), NW32=2 * (-(-d // 64)), KEY_BITS=31 if dtype == "fp32" else 15, BLOCK_R=32)
    return ASTSource(fn=compress_kernel, signature=sig, constexprs=consts, attrs=_aligned(compress_kernel, sig, {
        "X", "VALS", "BITS", "stride_xb", "stride_xh", "stride_xt", "stride_vb", "stride_vh", "stride_bb",
        "stride_bh"}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kernel", nargs="?", default="decode")
    parser.add_argument("--dump")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--num-warps", type=int, default=4)
    args = parser.parse_args()
    if args.kernel == "compress":
        src = compress_source(d=args.d)
    else:
        src = decode_source(d=args.d, block_n=args.block_n)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": args.num_warps})
    meta = compiled.metadata
    print(f"registers={compiled.n_regs if hasattr(compiled, 'n_regs') else '?'} shared={meta.shared} warps={meta.num_warps}")
    cubin = "/tmp/_k.cubin"
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    mix = collections.Counter(op.split(".")[0] for op in ops)
    print(f"instructions={len(ops)}")
    print(" ".join(f"{k}:{v}" for k, v in mix.most_common(40)))
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(compiled.asm["ttgir"] + "\n\n" + sass)


if __name__ == "__main__":
    main()
