"""Launcher of the decompress kernel (:mod:`mustafar.kernels.expand`)."""

from __future__ import annotations

import torch

from ..format import num_words
from ..kernels.expand import expand_kernel
from .common import cdiv, interpreting, next_pow2, on_device

__all__ = ["expand_triton"]

#: Rows (tokens of one head) per program.
BLOCK_ROWS = 32


def expand_triton(values: torch.Tensor, bitmaps: torch.Tensor, out: torch.Tensor) -> None:
    """Decompress ``values [b, h, n, k_keep]`` and ``bitmaps [b, h, n, words]`` (int64) into ``out [b, h, n, d]``.

    Views into a store are fine (last dims contiguous); ``out`` (the values' dtype, last dim
    contiguous) gets zeros where pruned, as :func:`mustafar.format.expand`.

    Raises:
        ValueError: shapes, dtypes or layouts that do not fit together.
    """
    b, h, n, d = out.shape
    if values.shape[:3] != (b, h, n) or bitmaps.shape != (b, h, n, num_words(d)) or bitmaps.dtype != torch.int64 \
            or out.dtype != values.dtype or out.stride(-1) != 1 or values.stride(-1) != 1 or bitmaps.stride(-1) != 1:
        raise ValueError(f"expected values [{b}, {h}, {n}, k], int64 bitmaps [{b}, {h}, {n}, {num_words(d)}] and out "
                         f"[{b}, {h}, {n}, {d}] of the values' dtype, last dims contiguous; got {tuple(values.shape)} "
                         f"{values.dtype}, {tuple(bitmaps.shape)} {bitmaps.dtype}, {tuple(out.shape)} {out.dtype}")
    rows = b * h * n
    if rows == 0:
        return
    bits32 = bitmaps.view(torch.int32)
    with on_device(out):
        expand_kernel[(cdiv(rows, BLOCK_ROWS),)](
            values, *values.stride()[:3], bits32, *bits32.stride()[:3], out, *out.stride()[:3],
            h, n, rows, D=d, DP=max(16, next_pow2(d)), NW32=2 * num_words(d), BLOCK_R=BLOCK_ROWS,
            INTERPRET=interpreting(), num_warps=4,
        )
