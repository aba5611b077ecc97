"""Probe (issue 15, not part of the library): where the Triton FP8 decompression differs from ``expand_store`` on a GPU.

The interpreter-verified kernel fails ``tests/test_fused_bookkeeping.py``'s bit-exact FP8 expand tests on an H200
(2026-12-03: sparsity 0 at every dtype and head_dim; arbitrary codes and scales at every dtype). This prints the
first differing entries of those inputs: position, kernel bits, reference bits, the e4m3 byte and the row's scale.

Usage (CUDA machine, repository root): ``PYTHONPATH=src python benchmarks/probes/fp8_triton_diff.py``
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from test_fused_bookkeeping import DEVICE, FP8, _fp8_store_rows  # noqa: E402

from mustafar import compress  # noqa: E402
from mustafar.format import expand_store  # noqa: E402
from mustafar.launch.expand import expand_triton  # noqa: E402

INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def report(name, values, bitmaps, scales, head_dim, dtype):
    out = torch.empty(*values.shape[:3], head_dim, dtype=dtype, device=DEVICE)
    expand_triton(values, bitmaps, out, scales)
    want = expand_store(values, bitmaps, head_dim, scales)
    both_nan = out.isnan() & want.isnan()
    diff = (out.view(INT[dtype]) != want.view(INT[dtype])) & ~both_nan
    idx = diff.nonzero()
    print(f"== {name}: {len(idx)} of {diff.numel()} entries differ")
    for b, h, t, c in idx[:6].tolist():
        print(f"  [{b},{h},{t},{c}] kernel {out[b, h, t, c].item()!r} ({out.view(INT[dtype])[b, h, t, c].item()}) "
              f"ref {want[b, h, t, c].item()!r} ({want.view(INT[dtype])[b, h, t, c].item()}) "
              f"scale {scales[b, h, t].item()!r} row values {values.view(torch.uint8)[b, h, t, :4].tolist()}")


def compress_scales(dtype):
    """The Triton FP8 compress's scales against the reference's (the fused bookkeeping computes them alike)."""
    from mustafar.backends import TorchBackend
    from mustafar.format import BitmapKV
    from mustafar.launch.compress import compress_triton

    torch.manual_seed(5)
    x = torch.randn(2, 4, 256, 64).to(dtype).to(DEVICE)
    out = []
    for compress_into in (TorchBackend().compress, compress_triton):
        store = BitmapKV.empty(2, 4, 64, 0.5, dtype, DEVICE, capacity=256, kept_dtype=FP8)
        values, bitmaps = store.storage
        compress_into(x, 0.5, values, bitmaps, store.scale_storage)
        out.append((values.view(torch.uint8), store.scale_storage))
    (v_ref, s_ref), (v_tri, s_tri) = out
    bad = (s_ref.view(INT[dtype]) != s_tri.view(INT[dtype])).nonzero()
    print(f"== compress scales {dtype}: {len(bad)} of {s_ref.numel()} differ; values differ in "
          f"{int((v_ref != v_tri).sum())} of {v_ref.numel()}")
    for b, h, t in bad[:4].tolist():
        amax = x[b, h, t].float().abs().max().item()
        print(f"  [{b},{h},{t}] triton {s_tri[b, h, t].item()!r} ref {s_ref[b, h, t].item()!r} amax {amax!r} "
              f"amax/448 in fp64 {amax / 448!r}")


def main():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        compress_scales(dtype)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        store = _fp8_store_rows(dtype, 64, 0.0)
        values, bitmaps = store.storage
        report(f"s=0 store rows {dtype}", values, bitmaps, store.scale_storage, 64, dtype)
        torch.manual_seed(3)
        store = compress(torch.randn(1, 2, 40, 80).to(dtype), 0.5, kept_dtype=FP8)
        values, bitmaps = (t[:, :, :40].to(DEVICE) for t in store.storage)
        values.view(torch.uint8).random_(0, 256)
        values.view(torch.uint8)[0, 0, 0, :32] = torch.arange(0, 256, 8, dtype=torch.uint8)
        scales = (torch.randn(1, 2, 40) * 2.0 ** torch.randint(-20, 20, (1, 2, 40))).to(dtype).to(DEVICE)
        report(f"arbitrary codes {dtype}", values, bitmaps, scales, 80, dtype)


if __name__ == "__main__":
    main()
