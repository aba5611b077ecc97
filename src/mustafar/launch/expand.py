"""Launcher of the decompress kernel (:mod:`mustafar.kernels.expand`)."""

from __future__ import annotations

import torch

from .._checks import CACHE_DTYPES
from ..format import num_words
from ..fp8 import is_fp8
from ..kernels.expand import expand_kernel
from .common import cdiv, interpreting, next_pow2, on_device

__all__ = ["expand_triton"]

#: Rows (tokens of one head) per program.
BLOCK_ROWS = 32


def expand_triton(values: torch.Tensor, bitmaps: torch.Tensor, out: torch.Tensor,
                  scales: torch.Tensor | None = None) -> None:
    """Decompress ``values [b, h, n, k_keep]`` and ``bitmaps [b, h, n, words]`` (int64) into ``out [b, h, n, d]``.

    Views into a store are fine (last dims contiguous); ``out`` (the values' dtype, last dim
    contiguous) gets zeros where pruned, as :func:`mustafar.format.expand`. FP8 kept values
    (``float8_e4m3fn``, issue 15) take ``scales [b, h, n]`` in ``out``'s dtype (fp16/bf16/fp32, tokens
    contiguous) and are dequantised as :func:`mustafar.format.expand_store` does, bit for bit.

    Raises:
        ValueError: shapes, dtypes or layouts that do not fit together; ``scales`` without FP8 values,
            FP8 values without ``scales``, or ``scales`` of the wrong shape, dtype, device or layout.
    """
    b, h, n, d = out.shape
    fp8 = is_fp8(values.dtype)
    kept_dtype = out.dtype if fp8 else values.dtype
    if values.shape[:3] != (b, h, n) or bitmaps.shape != (b, h, n, num_words(d)) or bitmaps.dtype != torch.int64 \
            or out.dtype != kept_dtype or out.stride(-1) != 1 or values.stride(-1) != 1 or bitmaps.stride(-1) != 1:
        raise ValueError(f"expected values [{b}, {h}, {n}, k], int64 bitmaps [{b}, {h}, {n}, {num_words(d)}] and out "
                         f"[{b}, {h}, {n}, {d}] of the values' dtype (for FP8 values, the scales'), last dims "
                         f"contiguous; got {tuple(values.shape)} {values.dtype}, {tuple(bitmaps.shape)} "
                         f"{bitmaps.dtype}, {tuple(out.shape)} {out.dtype}")
    _check_scales(values, scales, out)
    rows = b * h * n
    if rows == 0:
        return
    bits32 = bitmaps.view(torch.int32)
    scale_args = {}
    if fp8:
        values = values.view(torch.uint8)
        scale_args = dict(SCALES=scales, s_sb=scales.stride(0), s_sh=scales.stride(1), FP8=True,
                          LIMIT=torch.finfo(out.dtype).max)
    with on_device(out):
        expand_kernel[(cdiv(rows, BLOCK_ROWS),)](
            values, *values.stride()[:3], bits32, *bits32.stride()[:3], out, *out.stride()[:3],
            h, n, rows, D=d, DP=max(16, next_pow2(d)), NW32=2 * num_words(d), BLOCK_R=BLOCK_ROWS,
            INTERPRET=interpreting(), num_warps=4, **scale_args,
        )


def _check_scales(values: torch.Tensor, scales: torch.Tensor | None, out: torch.Tensor) -> None:
    """FP8 ``values`` need ``scales [b, h, n]`` of ``out``'s dtype (fp16/bf16/fp32), on its device, tokens
    contiguous; other values take none."""
    if not is_fp8(values.dtype):
        if scales is not None:
            raise ValueError(f"scales are only for float8_e4m3fn values, got values of {values.dtype} and scales "
                             f"{tuple(scales.shape)} {scales.dtype}")
        return
    if scales is None:
        raise ValueError(f"float8_e4m3fn values need scales [{', '.join(map(str, out.shape[:3]))}] of out's dtype "
                         f"{out.dtype}, got None")
    if out.dtype not in CACHE_DTYPES or scales.shape != out.shape[:3] or scales.dtype != out.dtype \
            or scales.device != out.device or (scales.shape[2] > 1 and scales.stride(2) != 1):
        raise ValueError(f"scales must be [{', '.join(map(str, out.shape[:3]))}] of out's dtype (fp16/bf16/fp32, "
                         f"here {out.dtype}) on {out.device}, tokens contiguous; got {tuple(scales.shape)} "
                         f"{scales.dtype} on {scales.device} with strides {scales.stride()}")
