"""Bit helpers for the Triton kernels (``@triton.jit`` only).

``popcount`` uses the hardware instruction on the GPU and a SWAR bit trick
under the Triton interpreter (``INTERPRET``), which implements neither
``libdevice`` nor inline assembly; ``dot`` upcasts to fp32 there because the
interpreter's bf16 ``tl.dot`` is wrong (Triton 3.9).
"""

import triton
import triton.language as tl


@triton.jit
def popcount(x, INTERPRET: tl.constexpr):
    """Number of set bits of each int32 element of ``x`` (int32)."""
    if not INTERPRET:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def low_bits(shift):
    """``(1 << shift) - 1`` for int32 ``shift`` in [0, 31]."""
    return (tl.full(shift.shape, 1, tl.int32) << shift) - 1


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` in fp32 (``PRECISION``: "ieee" for fp32 inputs, else "tf32", ignored for 16-bit)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def token_rows(BLOCK_R: tl.constexpr, n_rows, tokens, kv_heads):
    """This program's ``BLOCK_R`` rows of a ``[batch, kv_heads, tokens]`` grid, row ``r`` being token
    ``r % tokens`` of (batch, head) ``r // tokens``: ``(row_ok, b, h, t)``, each ``[BLOCK_R]``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bh = rows // tokens
    return rows < n_rows, bh // kv_heads, bh % kv_heads, rows % tokens
