"""Launcher of the prune + compress kernel."""

from __future__ import annotations

import torch

from ..format import num_words
from ..kernels.compress import compress_kernel
from ..pruning import keep_count
from .common import cdiv, next_pow2, on_device

#: Rows per program.
BLOCK_ROWS = 32


def compress_triton(x: torch.Tensor, sparsity: float, values: torch.Tensor, bitmaps: torch.Tensor,
                    scales: torch.Tensor | None = None) -> None:
    """Prune ``x [b, h, n, d]`` per token and write ``values [b, h, n, k_keep]`` and ``bitmaps [b, h, n, words]``.

    ``values`` and ``bitmaps`` are views into the store (last dim contiguous); written in place. FP8 kept
    values: ``values`` float8_e4m3fn (written as raw bits) and ``scales [b, h, n]`` of ``x``'s dtype.
    """
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = b * h * n
    if rows == 0:
        return
    bits32 = bitmaps.view(torch.int32)
    fp8 = scales is not None
    if fp8:
        values = values.view(torch.uint8)
    scale_args = (scales, *scales.stride()) if fp8 else (x, 0, 0, 0)
    with on_device(x):
        compress_kernel[(cdiv(rows, BLOCK_ROWS),)](
            x, x.stride(0), x.stride(1), x.stride(2),
            values, values.stride(0), values.stride(1), values.stride(2),
            bits32, bits32.stride(0), bits32.stride(1), bits32.stride(2),
            *scale_args,
            h, n, rows, keep_count(d, sparsity),
            D=d, DP=max(16, next_pow2(d)), NW32=2 * num_words(d), KEY_BITS=31 if x.dtype == torch.float32 else 15,
            BLOCK_R=BLOCK_ROWS, KEPT_FP8=fp8, TINY=torch.finfo(x.dtype).tiny if fp8 else 0.0, num_warps=4,
        )
