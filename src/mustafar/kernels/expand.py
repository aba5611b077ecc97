"""Decompress kernel: store rows (``values`` + int32 bitmap words) -> dense ``[.., head_dim]`` (``@triton.jit`` only).

Per row and channel: the bit of the channel in its word; its rank among the kept
channels is the popcount of the lower bits of that word plus the popcounts of the
earlier words; the value is ``values[rank]`` where the bit is set, else zero.
The inverse of :mod:`mustafar.kernels.compress`; equal to :func:`mustafar.format.expand`.

FP8 kept values (``FP8``, :mod:`mustafar.fp8`): the values are e4m3 bits (uint8), dequantised with the
row's scale into the output dtype exactly as :func:`mustafar.format.expand_store` dequantises (NaN at the
kept channels of a NaN-scale row, zeros at its pruned ones).
"""

import triton
import triton.language as tl

from .bits import low_bits, popcount, token_rows
from .fp8 import dequantize, widen


@triton.jit
def expand_kernel(
    VALS, s_vb, s_vh, s_vt, BITS, s_bb, s_bh, s_bt, OUT, s_ob, s_oh, s_ot,
    kv_heads, tokens, n_rows,
    D: tl.constexpr, DP: tl.constexpr, NW32: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
    SCALES=None, s_sb=0, s_sh=0, FP8: tl.constexpr = False, LIMIT: tl.constexpr = 0.0,
):
    """``BLOCK_R`` rows per program; row ``r`` is token ``r % tokens`` of (batch, head) ``r // tokens``.

    ``FP8``: ``VALS`` holds e4m3 bits (uint8), ``SCALES`` the rows' scales (OUT's dtype, tokens contiguous);
    ``LIMIT`` is the largest finite value of OUT's dtype (the reference's clamp).
    """
    row_ok, b, h, t = token_rows(BLOCK_R, n_rows, tokens, kv_heads)
    ch = tl.arange(0, DP)
    ok = row_ok[:, None] & (ch < D)[None, :]
    words = tl.arange(0, NW32)
    bits_row = BITS + (b * s_bb + h * s_bh + t * s_bt)
    all_words = tl.load(bits_row[:, None] + words[None, :], mask=row_ok[:, None], other=0)
    counts = popcount(all_words, INTERPRET)
    word_of = ch // 32
    before = tl.sum(tl.where(words[None, None, :] < word_of[None, :, None], counts[:, None, :], 0), axis=2)
    word = tl.load(bits_row[:, None] + word_of[None, :], mask=ok, other=0)
    shift = (ch % 32)[None, :] + tl.zeros([BLOCK_R, DP], tl.int32)
    kept = ((word >> shift) & 1) != 0
    rank = before + popcount(word & low_bits(shift), INTERPRET)
    v_ptr = VALS + (b * s_vb + h * s_vh + t * s_vt)[:, None] + rank
    if FP8:
        scale = widen(tl.load(SCALES + b * s_sb + h * s_sh + t, mask=row_ok, other=0.0))
        raw = tl.load(v_ptr, mask=ok & kept, other=0)
        x = dequantize(raw, scale[:, None], LIMIT, OUT.dtype.element_ty)
        x = tl.where(ok & kept, x, tl.zeros_like(x))
    else:
        x = tl.load(v_ptr, mask=ok & kept, other=0.0)
    tl.store(OUT + (b * s_ob + h * s_oh + t * s_ot)[:, None] + ch[None, :], x, mask=ok)
