"""Fused sparse decode attention over the bitmap format (``@triton.jit`` only).

Flash-decoding layout: the grid is (split of the token axis, batch * kv_head);
each program holds all query rows of one GQA group (``group * q_len`` rows) so
every compressed row is read from memory once, keeps an online softmax in fp32
and writes an unnormalised partial result; ``merge_splits`` combines them. The
last split of every (batch, kv_head) runs over the dense local window.

Expansion of a compressed row costs a few operations per group of four
channels (a nibble of the bitmap), not per channel: the start of a nibble's
values is one popcount of its masked bitmap word plus the row's prefix count
of the earlier words; the up to four values of the nibble are contiguous.
Channel ``4 * g + c`` goes to "plane" ``c`` (``[BLOCK_N, groups]``); the
query is split into the same planes, so four small dot products replace one
with the channels in natural order.

FP8 kept values (``K_FP8`` / ``V_FP8``, :mod:`mustafar.fp8`): the values are read
as e4m3 bits and dequantised with their token's scale into the cache dtype while
the planes are expanded, exactly as the reference dequantises before it attends.

Source of the method: Mustafar, arXiv 2505.22913.
"""

import triton
import triton.language as tl

from .bits import dot, low_bits, popcount
from .fp8 import dequantize


@triton.jit
def _kept(ptr, mask, scale, FP8: tl.constexpr, LIMIT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Kept values at ``ptr`` where ``mask`` (else 0), FP8 ones dequantised with ``scale [1, BLOCK_N]``."""
    if FP8:
        return tl.where(mask, dequantize(tl.load(ptr, mask=mask, other=0), scale, LIMIT, OUT_DTYPE), 0.0)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _expand_planes(vals_ptr, bits_ptr, rows, row_ok, stride_vt, stride_bt, groups, group_ok,
                   NW32: tl.constexpr, INTERPRET: tl.constexpr, scale_ptr=None, stride_st=0,
                   FP8: tl.constexpr = False, LIMIT: tl.constexpr = 0.0, OUT_DTYPE: tl.constexpr = None):
    """Four dense planes ``[NG, BLOCK_N]`` (channel ``4 g + c`` of row ``n`` at ``[g, n]`` of plane ``c``).

    ``FP8``: ``vals_ptr`` holds e4m3 bits (uint8), ``scale_ptr`` the rows' scales; planes in ``OUT_DTYPE``.
    """
    word_idx = groups // 8
    ok = group_ok[:, None] & row_ok[None, :]
    words = tl.load(bits_ptr + rows[None, :] * stride_bt + word_idx[:, None], mask=ok, other=0)
    prefix = tl.zeros(words.shape, tl.int32)
    for w in tl.static_range(NW32 - 1):
        count = popcount(tl.load(bits_ptr + rows * stride_bt + w, mask=row_ok, other=0), INTERPRET)
        prefix += tl.where(word_idx[:, None] > w, count[None, :], 0)
    shift = (groups % 8) * 4
    start = prefix + popcount(words & low_bits(shift)[:, None], INTERPRET)
    nibble = (words >> shift[:, None]) & 15
    b0 = nibble & 1
    b1 = (nibble >> 1) & 1
    b2 = (nibble >> 2) & 1
    base = vals_ptr + rows[None, :] * stride_vt + start
    scale = None
    if FP8:
        scale = tl.load(scale_ptr + rows * stride_st, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    p0 = _kept(base, b0 != 0, scale, FP8, LIMIT, OUT_DTYPE)
    p1 = _kept(base + b0, b1 != 0, scale, FP8, LIMIT, OUT_DTYPE)
    p2 = _kept(base + b0 + b1, b2 != 0, scale, FP8, LIMIT, OUT_DTYPE)
    p3 = _kept(base + b0 + b1 + b2, nibble >= 8, scale, FP8, LIMIT, OUT_DTYPE)
    return p0, p1, p2, p3


@triton.jit
def _load_planes(ptr, rows, row_ok, stride_t, groups, D: tl.constexpr):
    """Four planes ``[NG, BLOCK_N]`` of dense rows (channel ``4 g + c`` in plane ``c``)."""
    base = ptr + rows[None, :] * stride_t + 4 * groups[:, None]
    ok = row_ok[None, :]
    p0 = tl.load(base, mask=ok & (4 * groups[:, None] < D), other=0.0)
    p1 = tl.load(base + 1, mask=ok & (4 * groups[:, None] + 1 < D), other=0.0)
    p2 = tl.load(base + 2, mask=ok & (4 * groups[:, None] + 2 < D), other=0.0)
    p3 = tl.load(base + 3, mask=ok & (4 * groups[:, None] + 3 < D), other=0.0)
    return p0, p1, p2, p3


@triton.jit
def _scores(k0, k1, k2, k3, q0, q1, q2, q3, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``S [ROWS, BLOCK_N]`` = sum over planes of ``Q_c @ K_c`` (fp32 accumulate)."""
    s = dot(q0, k0, tl.zeros([q0.shape[0], k0.shape[1]], tl.float32), PRECISION, INTERPRET)
    s = dot(q1, k1, s, PRECISION, INTERPRET)
    s = dot(q2, k2, s, PRECISION, INTERPRET)
    return dot(q3, k3, s, PRECISION, INTERPRET)


@triton.jit
def _mask_bias(MASK, mask_base, columns, col_ok, row_ok, mask_floor, MASK_MODE: tl.constexpr):
    """Additive bias in log2 units ``[ROWS, BLOCK_N]`` from a bool (1) or additive float (2) mask.

    An additive entry at or below ``mask_floor`` (half the mask dtype's minimum; ``-inf`` included)
    masks its key: ``-inf``, so that a row masked everywhere gives zeros (issue 17). Other entries
    are clamped before the change of base, so that a finite bias stays finite.
    """
    ptr = MASK + mask_base[:, None] + columns[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if MASK_MODE == 1:
        keep = tl.load(ptr, mask=ok, other=1)
        return tl.where(keep != 0, 0.0, float("-inf"))
    else:
        bias = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        return tl.where(bias <= mask_floor, float("-inf"), tl.maximum(bias, -2.0e38) * 1.4426950408889634)


@triton.jit
def _softmax_step(s, m_i, l_i, acc0, acc1, acc2, acc3, positions, last_visible, valid):
    """Online-softmax update with a block of scores ``S [ROWS, BLOCK_N]`` (log2 units, biased).

    Returns ``P`` and the new state (accumulators ``[NG, ROWS]`` rescaled).
    """
    visible = valid[None, :] & (positions[None, :] <= last_visible[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, m_new, l_i, acc0 * alpha[None, :], acc1 * alpha[None, :], acc2 * alpha[None, :], acc3 * alpha[None, :]


@triton.jit
def _accumulate(p, v0, v1, v2, v3, acc0, acc1, acc2, acc3, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc_c [NG, ROWS] += V_c [NG, BLOCK_N] @ P^T``."""
    pt = tl.trans(p).to(v0.dtype)
    acc0 = dot(v0, pt, acc0, PRECISION, INTERPRET)
    acc1 = dot(v1, pt, acc1, PRECISION, INTERPRET)
    acc2 = dot(v2, pt, acc2, PRECISION, INTERPRET)
    acc3 = dot(v3, pt, acc3, PRECISION, INTERPRET)
    return acc0, acc1, acc2, acc3


@triton.jit
def sparse_decode_kernel(
    Q, stride_qb, stride_qh, stride_ql,
    KV, stride_kvb, stride_kvh, stride_kvt,
    KB, stride_kbb, stride_kbh, stride_kbt,
    VV, stride_vvb, stride_vvh, stride_vvt,
    VB, stride_vbb, stride_vbh, stride_vbt,
    KW, stride_kwb, stride_kwh, stride_kwt,
    VW, stride_vwb, stride_vwh, stride_vwt,
    MASK, stride_mb, stride_mh, stride_ml,
    OUT, M_OUT, L_OUT,
    kv_heads, group, q_len, n_compressed, n_window, tokens_per_split, n_splits, scale_log2e, mask_floor,
    D: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr, NW32: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    KS=None, stride_ksb=0, stride_ksh=0, stride_kst=0, VS=None, stride_vsb=0, stride_vsh=0, stride_vst=0,
    K_FP8: tl.constexpr = False, V_FP8: tl.constexpr = False, LIMIT: tl.constexpr = 0.0,
):
    """One split of the token axis for one (batch, kv_head); partials to ``OUT [splits+1, B*Hkv, ROWS, D]``.

    ``K_FP8`` / ``V_FP8``: ``KV`` / ``VV`` hold e4m3 bits (uint8) with per-token scales ``KS`` / ``VS``
    ``[b, h, t]`` in the query's dtype; ``LIMIT``: that dtype's largest finite value.
    """
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    rows = tl.arange(0, ROWS)
    row_ok = rows < group * q_len
    head = h * group + rows // q_len
    qi = rows % q_len
    groups = tl.arange(0, NG)
    group_ok = 4 * groups < D
    q_base = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + 4 * groups[None, :]
    q_ok = row_ok[:, None] & group_ok[None, :]
    q0 = tl.load(q_base, mask=q_ok, other=0.0)
    q1 = tl.load(q_base + 1, mask=q_ok & (4 * groups[None, :] + 1 < D), other=0.0)
    q2 = tl.load(q_base + 2, mask=q_ok & (4 * groups[None, :] + 2 < D), other=0.0)
    q3 = tl.load(q_base + 3, mask=q_ok & (4 * groups[None, :] + 3 < D), other=0.0)
    total = n_compressed + n_window
    mask_base = b * stride_mb + head * stride_mh + qi * stride_ml
    last_visible = total - q_len + qi
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc0 = tl.zeros([NG, ROWS], tl.float32)
    acc1 = tl.zeros([NG, ROWS], tl.float32)
    acc2 = tl.zeros([NG, ROWS], tl.float32)
    acc3 = tl.zeros([NG, ROWS], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    if split < n_splits:
        kv_ptr = KV + b * stride_kvb + h * stride_kvh
        kb_ptr = KB + b * stride_kbb + h * stride_kbh
        vv_ptr = VV + b * stride_vvb + h * stride_vvh
        vb_ptr = VB + b * stride_vbb + h * stride_vbh
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, n_compressed)
        ks_ptr = KS + b * stride_ksb + h * stride_ksh if K_FP8 else KS
        vs_ptr = VS + b * stride_vsb + h * stride_vsh if V_FP8 else VS
        for start in range(lo, hi, BLOCK_N):
            t = start + offs
            t_ok = t < hi
            k0, k1, k2, k3 = _expand_planes(kv_ptr, kb_ptr, t, t_ok, stride_kvt, stride_kbt, groups, group_ok,
                                            NW32, INTERPRET, ks_ptr, stride_kst, K_FP8, LIMIT,
                                            Q.dtype.element_ty)
            s = _scores(k0, k1, k2, k3, q0, q1, q2, q3, PRECISION, INTERPRET) * scale_log2e
            if MASK_MODE != 0:
                s += _mask_bias(MASK, mask_base, t, t_ok, row_ok, mask_floor, MASK_MODE)
            p, m_i, l_i, acc0, acc1, acc2, acc3 = _softmax_step(s, m_i, l_i, acc0, acc1, acc2, acc3, t,
                                                                last_visible, t_ok)
            v0, v1, v2, v3 = _expand_planes(vv_ptr, vb_ptr, t, t_ok, stride_vvt, stride_vbt, groups, group_ok,
                                            NW32, INTERPRET, vs_ptr, stride_vst, V_FP8, LIMIT,
                                            Q.dtype.element_ty)
            acc0, acc1, acc2, acc3 = _accumulate(p, v0, v1, v2, v3, acc0, acc1, acc2, acc3, PRECISION, INTERPRET)
    else:
        kw_ptr = KW + b * stride_kwb + h * stride_kwh
        vw_ptr = VW + b * stride_vwb + h * stride_vwh
        for start in range(0, n_window, BLOCK_N):
            t = start + offs
            t_ok = t < n_window
            k0, k1, k2, k3 = _load_planes(kw_ptr, t, t_ok, stride_kwt, groups, D)
            s = _scores(k0, k1, k2, k3, q0, q1, q2, q3, PRECISION, INTERPRET) * scale_log2e
            if MASK_MODE != 0:
                s += _mask_bias(MASK, mask_base, n_compressed + t, t_ok, row_ok, mask_floor, MASK_MODE)
            p, m_i, l_i, acc0, acc1, acc2, acc3 = _softmax_step(s, m_i, l_i, acc0, acc1, acc2, acc3,
                                                                n_compressed + t, last_visible, t_ok)
            v0, v1, v2, v3 = _load_planes(vw_ptr, t, t_ok, stride_vwt, groups, D)
            acc0, acc1, acc2, acc3 = _accumulate(p, v0, v1, v2, v3, acc0, acc1, acc2, acc3, PRECISION, INTERPRET)
    part = split * tl.num_programs(1) + bh
    out_ptr = OUT + (part * ROWS + rows[None, :]) * D + 4 * groups[:, None]
    o_ok = group_ok[:, None]
    tl.store(out_ptr, acc0, mask=o_ok)
    tl.store(out_ptr + 1, acc1, mask=o_ok & (4 * groups[:, None] + 1 < D))
    tl.store(out_ptr + 2, acc2, mask=o_ok & (4 * groups[:, None] + 2 < D))
    tl.store(out_ptr + 3, acc3, mask=o_ok & (4 * groups[:, None] + 3 < D))
    tl.store(M_OUT + part * ROWS + rows, m_i)
    tl.store(L_OUT + part * ROWS + rows, l_i)


@triton.jit
def merge_splits_kernel(
    OUT, M_OUT, L_OUT, O, stride_ob, stride_oh, stride_ol,
    kv_heads, group, q_len, n_parts,
    D: tl.constexpr, ROWS: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Combine the partials of all splits of one (batch, kv_head, query row) into ``O`` (query dtype)."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    n_bh = tl.num_programs(0)
    b = bh // kv_heads
    h = bh % kv_heads
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, DP)
    m_run = float("-inf")
    l_run = 0.0
    acc = tl.zeros([DP], tl.float32)
    for s0 in range(0, n_parts, BLOCK_S):
        sp = s0 + splits
        ok = sp < n_parts
        idx = (sp * n_bh + bh) * ROWS + r
        m = tl.load(M_OUT + idx, mask=ok, other=float("-inf"))
        l_s = tl.load(L_OUT + idx, mask=ok, other=0.0)
        o = tl.load(OUT + idx[:, None] * D + dims[None, :], mask=ok[:, None] & (dims[None, :] < D), other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(m - m_safe)
        alpha = tl.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(l_s * w, axis=0)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        m_run = m_new
    out = tl.where(l_run == 0, 0.0, acc / l_run)  # fully masked rows give 0; a NaN input stays NaN
    head = h * group + r // q_len
    o_ptr = O + b * stride_ob + head * stride_oh + (r % q_len) * stride_ol + dims
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=dims < D)
