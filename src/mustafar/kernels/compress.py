"""Prune + compress kernel: rows ``[.., head_dim]`` -> ``values`` and int32 bitmap words (``@triton.jit`` only).

Per row it finds the ``k_keep``-th largest magnitude by bisection over the bit
pattern of ``|x|`` (sign cleared; the pattern orders like the magnitude, NaN
above infinity), keeps everything above it and the lowest channels among the
ties, then writes the kept entries in channel order and the bitmap. Identical
bit for bit to :func:`mustafar.reference.compress_reference`.
With ``KEPT_FP8`` the kept entries are written as e4m3 bits with one scale per
row (the rule of :mod:`mustafar.fp8`, bit for bit as its reference).
Source of the rule: Mustafar, arXiv 2505.22913.
"""

import triton
import triton.language as tl

from .bits import token_rows
from .fp8 import quantize_rows, row_scales, widen


@triton.jit
def _magnitude_keys(x, KEY_BITS: tl.constexpr):
    """The bit pattern of ``|x|`` as int32 (15 bits for fp16/bf16, 31 for fp32)."""
    if KEY_BITS == 31:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        return x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def keep_mask(keys, k_keep, KEY_BITS: tl.constexpr):
    """Per-token rule on ``keys [ROWS, DP]`` (int32 magnitude keys, -1 on padding channels): True for the
    ``k_keep`` largest of each row, ties to the lower channel (bisection over the ``KEY_BITS`` key bits)."""
    threshold = tl.zeros([keys.shape[0]], tl.int32)
    for bit in tl.static_range(KEY_BITS - 1, -1, -1):
        candidate = threshold | (1 << bit)
        count = tl.sum((keys >= candidate[:, None]).to(tl.int32), axis=1)
        threshold = tl.where(count >= k_keep, candidate, threshold)
    above = keys > threshold[:, None]
    ties = (keys == threshold[:, None]).to(tl.int32)
    room = k_keep - tl.sum(above.to(tl.int32), axis=1)
    return above | ((ties != 0) & (tl.cumsum(ties, axis=1) <= room[:, None]))


@triton.jit
def select_kept(x, ch_ok, k_keep, KEY_BITS: tl.constexpr):
    """The per-token rule on a tile ``x [ROWS, DP]`` (``ch_ok [DP]``: real channels): ``(keep, position)``,
    ``keep`` True for the ``k_keep`` largest ``|x|`` of each row (:func:`keep_mask`), ``position`` each
    entry's slot among the row's kept values (int32; meaningful where ``keep``)."""
    keys = tl.where(ch_ok[None, :], _magnitude_keys(x, KEY_BITS), -1)
    keep = keep_mask(keys, k_keep, KEY_BITS)
    return keep, tl.cumsum(keep.to(tl.int32), axis=1) - 1


@triton.jit
def pack_bits(keep, ch, NW32: tl.constexpr):
    """The bitmap words ``[ROWS, NW32]`` (int32) of ``keep [ROWS, DP]``: bit ``c % 32`` of word ``c // 32``."""
    bit_value = tl.where(keep, 1 << (ch % 32), 0)[:, None, :]
    word_of = (ch // 32)[None, :]
    words = tl.arange(0, NW32)
    return tl.sum(tl.where(word_of[:, None, :] == words[None, :, None], bit_value, 0), axis=2)


@triton.jit
def compress_kernel(
    X, stride_xb, stride_xh, stride_xt,
    VALS, stride_vb, stride_vh, stride_vt,
    BITS, stride_bb, stride_bh, stride_bt,
    SCALES, stride_sb, stride_sh, stride_st,
    kv_heads, tokens, n_rows, k_keep,
    D: tl.constexpr, DP: tl.constexpr, NW32: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
    KEPT_FP8: tl.constexpr = False, TINY: tl.constexpr = 0.0,
):
    """``BLOCK_R`` rows per program; row ``r`` is token ``r % tokens`` of (batch, head) ``r // tokens``.

    ``KEPT_FP8``: ``VALS`` is uint8 (e4m3 bits), ``SCALES [b, h, t]`` of ``X``'s dtype, ``TINY`` its
    smallest normal.
    """
    row_ok, b, h, t = token_rows(BLOCK_R, n_rows, tokens, kv_heads)
    ch = tl.arange(0, DP)
    ch_ok = ch < D
    ok = row_ok[:, None] & ch_ok[None, :]
    x_ptr = X + (b * stride_xb + h * stride_xh + t * stride_xt)[:, None] + ch[None, :]
    x = tl.load(x_ptr, mask=ok, other=0.0)
    keep, position = select_kept(x, ch_ok, k_keep, KEY_BITS)
    v_ptr = VALS + (b * stride_vb + h * stride_vh + t * stride_vt)[:, None] + position
    if KEPT_FP8:
        xf = widen(x)
        scale = row_scales(xf, keep, TINY, X.dtype.element_ty)
        tl.store(v_ptr, quantize_rows(xf, scale), mask=keep & row_ok[:, None])
        tl.store(SCALES + b * stride_sb + h * stride_sh + t * stride_st, scale.to(SCALES.dtype.element_ty),
                 mask=row_ok)
    else:
        tl.store(v_ptr, x, mask=keep & row_ok[:, None])
    b_ptr = BITS + (b * stride_bb + h * stride_bh + t * stride_bt)[:, None] + tl.arange(0, NW32)[None, :]
    tl.store(b_ptr, pack_bits(keep, ch, NW32), mask=row_ok[:, None])
