"""One decode call at ``BATCH x CONTEXT`` (Llama-3-8B shape, fp16), three times: the target of Nsight Compute.

Usage (CUDA machine, repository root)::

    ncu --clock-control none -k regex:sparse_decode_kernel -s 2 -c 1 --metrics ... \
        python benchmarks/ncu_case.py BATCH CONTEXT SPARSITY [VARIANT [NAME]] [--fp8]

``VARIANT``: ``lib`` (default, the library's build) or a ``benchmarks/kernel_variants.py`` spec such as
``@7839734`` (the kernel of a git revision, built under ``NAME``, default ``v2``). ``--fp8``: the stores keep
e4m3 values (issue 15's ``kept_dtype=torch.float8_e4m3fn``) instead of fp16.
"""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mustafar import compress, sparse_decode_attention  # noqa: E402

WINDOW, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128


def main() -> None:
    argv = [a for a in sys.argv if a != "--fp8"]
    kept_dtype = torch.float8_e4m3fn if "--fp8" in sys.argv else None
    batch, context, sparsity = int(argv[1]), int(argv[2]), float(argv[3])
    variant = argv[4] if len(argv) > 4 else "lib"
    if variant != "lib":
        import kernel_variants

        csrc, flags = kernel_variants.build_source(variant, tempfile.mkdtemp())
        name = argv[5] if len(argv) > 5 else "v2"
        kernel_variants.use_variant(kernel_variants.load_variant(name, csrc, flags))
    torch.manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.float16)  # noqa: E731
    query = rand(batch, Q_HEADS, 1, HEAD_DIM)
    keys = compress(rand(batch, KV_HEADS, context - WINDOW, HEAD_DIM), sparsity, kept_dtype=kept_dtype)
    values = compress(rand(batch, KV_HEADS, context - WINDOW, HEAD_DIM), sparsity, kept_dtype=kept_dtype)
    key_window, value_window = rand(batch, KV_HEADS, WINDOW, HEAD_DIM), rand(batch, KV_HEADS, WINDOW, HEAD_DIM)
    for _ in range(3):
        out = sparse_decode_attention(query, keys, values, key_window, value_window, backend="cuda")
    torch.cuda.synchronize()
    print("ok", out.float().abs().mean().item())


if __name__ == "__main__":
    main()
