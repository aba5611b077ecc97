"""One decode step's write into a dense static cache, K and V in one launch (``@triton.jit`` only).

Per (batch, KV head) row: copy the new token's K and V into position ``length`` of the
preallocated buffers; the last program to finish (an atomic counter) advances ``length`` by
one and resets the counter. What a serving engine's cache-write kernel does; the baseline's
counterpart of :mod:`mustafar.kernels.bookkeeping`.
"""

import triton
import triton.language as tl


@triton.jit
def dense_write_kernel(
    KEYS, s_kb, s_kh, s_kt, VALUES, s_vb, s_vh, s_vt, K_NEW, s_knb, s_knh, V_NEW, s_vnb, s_vnh,
    LENGTH, COUNTER, kv_heads, n_rows,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr, ADVANCE: tl.constexpr,
):
    """``BLOCK_R`` rows per program; row ``r`` is (``r // kv_heads``, ``r % kv_heads``)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // kv_heads
    h = rows % kv_heads
    ch = tl.arange(0, DP)
    ok = (rows < n_rows)[:, None] & (ch < D)[None, :]
    length = tl.load(LENGTH)
    k = tl.load(K_NEW + (b * s_knb + h * s_knh)[:, None] + ch[None, :], mask=ok)
    v = tl.load(V_NEW + (b * s_vnb + h * s_vnh)[:, None] + ch[None, :], mask=ok)
    tl.store(KEYS + (b * s_kb + h * s_kh + length * s_kt)[:, None] + ch[None, :], k, mask=ok)
    tl.store(VALUES + (b * s_vb + h * s_vh + length * s_vt)[:, None] + ch[None, :], v, mask=ok)
    if ADVANCE:
        done = tl.atomic_add(COUNTER, 1)
        last = done == tl.num_programs(0) - 1
        tl.store(LENGTH, length + 1, mask=last)
        tl.store(COUNTER, 0, mask=last)
