"""One decode step's cache bookkeeping for a static compressed layer, K and V in one launch (``@triton.jit`` only).

Per (batch, KV head) row, for K and for V: read the token count ``length`` on the
device; if ``length >= w`` and the store row ``length - w`` exists, prune and
compress the ring token in slot ``length % w`` (the one about to be overwritten)
into that store row; then write the new token into the slot. The last program to
finish (an atomic counter) advances ``length`` by one and resets the counter, so
that every program reads the same ``length``. The selection is that of
:mod:`mustafar.kernels.compress` (bisection over the bit pattern of ``|x|``,
ties to the lower channel): bit-identical stores to the unfused path.
With ``KEPT_FP8`` (FP8 kept values, issue 15) the kept entries are written as e4m3 bits with the
token's scale in the ring's dtype, through the helpers of :mod:`mustafar.kernels.fp8` that the
compress kernel uses (the rule of :mod:`mustafar.fp8`, bit for bit).
Source of the pruning rule: Mustafar, arXiv 2505.22913.
"""

import triton
import triton.language as tl

from .compress import pack_bits, select_kept
from .fp8 import quantize_rows, row_scales, widen


@triton.jit
def _evict_and_write(
    RING, s_rb, s_rh, s_rt, NEW, s_nb, s_nh, VALS, s_vb, s_vh, s_vt, BITS, s_bb, s_bh, s_bt,
    SCALES, s_sb, s_sh, s_st, b, h, row_ok, slot, store_row, active, k_keep,
    D: tl.constexpr, DP: tl.constexpr, NW32: tl.constexpr, KEY_BITS: tl.constexpr, KEPT_FP8: tl.constexpr,
    TINY: tl.constexpr,
):
    """Compress ring slot ``slot`` of rows ``(b, h)`` into store row ``store_row`` (where ``active``); write NEW.

    ``KEPT_FP8``: ``VALS`` is uint8 (e4m3 bits), ``SCALES [b, h, capacity]`` of the ring's dtype, ``TINY``
    its smallest normal; otherwise ``SCALES`` is not touched.
    """
    ch = tl.arange(0, DP)
    ch_ok = ch < D
    ok = row_ok[:, None] & ch_ok[None, :]
    ring_ptr = RING + (b * s_rb + h * s_rh + slot * s_rt)[:, None] + ch[None, :]
    x = tl.load(ring_ptr, mask=ok, other=0.0)
    keep, position = select_kept(x, ch_ok, k_keep, KEY_BITS)
    write = row_ok & active
    v_ptr = VALS + (b * s_vb + h * s_vh + store_row * s_vt)[:, None] + position
    if KEPT_FP8:
        xf = widen(x)
        scale = row_scales(xf, keep, TINY, RING.dtype.element_ty)
        tl.store(v_ptr, quantize_rows(xf, scale), mask=keep & write[:, None])
        tl.store(SCALES + b * s_sb + h * s_sh + store_row * s_st, scale.to(SCALES.dtype.element_ty), mask=write)
    else:
        tl.store(v_ptr, x, mask=keep & write[:, None])
    b_ptr = BITS + (b * s_bb + h * s_bh + store_row * s_bt)[:, None] + tl.arange(0, NW32)[None, :]
    tl.store(b_ptr, pack_bits(keep, ch, NW32), mask=write[:, None])
    tl.debug_barrier()  # every thread has read the slot before any overwrites it
    new = tl.load(NEW + (b * s_nb + h * s_nh)[:, None] + ch[None, :], mask=ok, other=0.0)
    tl.store(ring_ptr, new, mask=ok)


@triton.jit
def bookkeeping_kernel(
    K_RING, s_krb, s_krh, s_krt, K_NEW, s_knb, s_knh,
    K_VALS, s_kvb, s_kvh, s_kvt, K_BITS, s_kbb, s_kbh, s_kbt, K_SCALES, s_ksb, s_ksh, s_kst,
    V_RING, s_vrb, s_vrh, s_vrt, V_NEW, s_vnb, s_vnh,
    V_VALS, s_vvb, s_vvh, s_vvt, V_BITS, s_vbb, s_vbh, s_vbt, V_SCALES, s_vsb, s_vsh, s_vst,
    LENGTH, COUNTER, kv_heads, n_rows, window, capacity, k_keep_k, k_keep_v,
    D: tl.constexpr, DP: tl.constexpr, NW32: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
    ADVANCE: tl.constexpr, KEPT_FP8: tl.constexpr = False, TINY: tl.constexpr = 0.0, KV_SPLIT: tl.constexpr = 0,
):
    """``BLOCK_R`` (batch, KV head) rows per program; row ``r`` is (``r // kv_heads``, ``r % kv_heads``).

    ``KEPT_FP8``: FP8 stores (``*_VALS`` uint8, ``*_SCALES`` the scales); else the scale arguments are unused.
    ``KV_SPLIT`` 1: a grid of two columns, K in column 0 and V in column 1 (half the serial work per program;
    ``benchmarks/probes/bookkeeping_latency.py`` times it); 0: one column doing K then V.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b = rows // kv_heads
    h = rows % kv_heads
    length = tl.load(LENGTH)
    slot = (length % window).to(tl.int32)
    store_row = length - window
    evict = (store_row >= 0) & (store_row < capacity)
    store_row = tl.where(evict, store_row, 0).to(tl.int32)  # masked off where not evicting
    # as a block of rows (the interpreter cannot mask with a scalar bool combined with a block)
    active = (tl.zeros([BLOCK_R], tl.int32) + evict.to(tl.int32)) != 0
    side = tl.program_id(1) * KV_SPLIT  # 0 in a one-column grid
    if side == 0:
        _evict_and_write(K_RING, s_krb, s_krh, s_krt, K_NEW, s_knb, s_knh, K_VALS, s_kvb, s_kvh, s_kvt,
                         K_BITS, s_kbb, s_kbh, s_kbt, K_SCALES, s_ksb, s_ksh, s_kst, b, h, row_ok, slot, store_row,
                         active, k_keep_k, D, DP, NW32, KEY_BITS, KEPT_FP8, TINY)
    if side == KV_SPLIT:
        _evict_and_write(V_RING, s_vrb, s_vrh, s_vrt, V_NEW, s_vnb, s_vnh, V_VALS, s_vvb, s_vvh, s_vvt,
                         V_BITS, s_vbb, s_vbh, s_vbt, V_SCALES, s_vsb, s_vsh, s_vst, b, h, row_ok, slot, store_row,
                         active, k_keep_v, D, DP, NW32, KEY_BITS, KEPT_FP8, TINY)
    if ADVANCE:
        done = tl.atomic_add(COUNTER, 1)
        last = done == tl.num_programs(0) * tl.num_programs(1) - 1
        tl.store(LENGTH, length + 1, mask=last)
        tl.store(COUNTER, 0, mask=last)
