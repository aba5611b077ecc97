"""FP8 (e4m3) kept values in the Triton kernels (``@triton.jit`` only): quantise, encode, decode.

The kernels read and write e4m3 as raw ``uint8`` bits and convert with integer bit operations, not with
Triton's ``float8e4nv`` casts: the interpreter's fp32 -> e4m3 cast rounds wrongly at binade edges (Triton
3.9: 31.15 -> 16, 127.9 -> 64; measured here, 36 of 4096 values in [-440, 440]) and the GPU cast needs
sm_89 or newer. The bit operations give torch's ``to(torch.float8_e4m3fn)`` (round to nearest even,
subnormals included) on every device and under ``TRITON_INTERPRET=1``. The rule: :mod:`mustafar.fp8`.
"""

import triton
import triton.language as tl

#: e4m3's largest finite value.
E4M3_MAX = tl.constexpr(448.0)
#: fp32 bits of 2**-6, e4m3's smallest normal; below it e4m3 steps by 2**-9.
_MIN_NORMAL_BITS = tl.constexpr(0x3C800000)
#: Exponent bias difference (127 - 7) in the position of e4m3's exponent field (<< 3).
_REBIAS = tl.constexpr(960)


@triton.jit
def encode_e4m3(y):
    """fp32 ``y`` with ``|y| <= 448`` (or NaN) -> e4m3 bits (uint8), rounded to nearest even; NaN -> 0x7F."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - _REBIAS
    shift = tl.minimum(14 - ((a >> 23) - 127), 25)
    mant = (a & 0x7FFFFF) | 0x800000
    subnormal = (mant + (1 << (shift - 1)) - 1 + ((mant >> shift) & 1)) >> shift
    code = tl.where(a > 0x7F800000, 0x7F, tl.where(a >= _MIN_NORMAL_BITS, normal, subnormal))
    return (code | sign).to(tl.uint8)


@triton.jit
def decode_e4m3(raw):
    """e4m3 bits (uint8, or int32 holding them) -> fp32 (exact; 0x7F / 0xFF -> NaN)."""
    b = raw.to(tl.int32) & 0xFF
    sign = (b & 0x80) << 24
    exponent = (b >> 3) & 15
    mantissa = b & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125
    # the sign goes in by its bit: a negation (0 - x on a GPU under Triton's fast-math flags) loses it on -0
    # (e4m3 0x80), measured on an H200 with Triton 3.6
    magnitude = tl.where(exponent == 0, subnormal, normal)
    value = (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def widen(x):
    """``x`` (fp16/bf16/fp32) as fp32, exactly.

    bf16 by bit operations: the interpreter's bf16 -> fp32 cast is wrong for subnormals (Triton 3.9:
    ``-1.0010e-38 -> -8.2652e-39``); on a GPU both give the same bits.
    """
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``DTYPE`` (returned in ``DTYPE``).

    bf16 by bit operations, NaN as torch writes it (0x7FC0): the interpreter's fp32 -> bf16 cast does not round
    to nearest even, and it is wrong for subnormals even where exact (Triton 3.9: ``-2.7551e-40``, bf16 bits
    0x8003, -> 0x8040); on a GPU the bits are the cast's.
    """
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(DTYPE, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def clamp_keep_nan(x, limit):
    """``x`` clamped to ``[-limit, limit]``; NaN stays NaN (comparisons with NaN are false)."""
    return tl.where(x > limit, limit, tl.where(x < -limit, -limit, x))


@triton.jit
def row_scales(x, keep, TINY: tl.constexpr, SCALE_DTYPE: tl.constexpr):
    """Per-row scales (fp32 holding ``SCALE_DTYPE`` values) of the kept entries of ``x [ROWS, DP]`` (fp32).

    ``0`` for all-zero rows, NaN for rows with a non-finite kept entry, else
    ``max(to_scale_dtype(amax / 448), TINY)``.
    """
    magnitude = tl.where(keep, tl.abs(x), 0.0)
    bad = tl.max(tl.where(keep & ((x != x) | (magnitude == float("inf"))), 1, 0), axis=1)
    amax = tl.max(tl.where(magnitude == magnitude, magnitude, 0.0), axis=1)
    scale = round_to(tl.math.div_rn(amax, E4M3_MAX), SCALE_DTYPE).to(tl.float32)
    scale = tl.where(amax == 0.0, 0.0, tl.maximum(scale, TINY))
    return tl.where(bad != 0, float("nan"), scale)


@triton.jit
def quantize_rows(x, scale):
    """e4m3 bits of ``x [ROWS, DP]`` (fp32) over per-row ``scale [ROWS]`` (fp32; 0 divides by 1)."""
    divisor = tl.where(scale == 0.0, 1.0, scale)
    return encode_e4m3(clamp_keep_nan(tl.math.div_rn(x, divisor[:, None]), E4M3_MAX))


@triton.jit
def dequantize(raw, scale, LIMIT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """``to(OUT_DTYPE)(clamp(decode(raw) * scale, -LIMIT, LIMIT))``: the dequantised kept values."""
    return round_to(clamp_keep_nan(decode_e4m3(raw) * scale, LIMIT), OUT_DTYPE)
