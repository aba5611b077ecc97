"""FP8 (e4m3) kept values: the quantisation rule of the compressed store, and its PyTorch reference.

Issue 15: storing the kept entries of each token as ``float8_e4m3fn`` with one scale per token and head
takes the cache to about a fifth of fp16 dense (K0.7V0.7: 57 B of 256 B per token-head at head_dim 128).
The bitmap is decided on the unquantised values (it equals the bitmap of the cache dtype); only the kept
values are quantised. The rule, per token and KV head, for kept values ``x`` (``k_keep`` of them):

- ``amax = max |x|`` over the kept values (the token's largest magnitude: top-k keeps it).
- ``scale``: stored in the **cache dtype** (fp16 / bf16 / fp32), ``[batch, kv_heads, tokens]``:
  ``0`` if ``amax == 0``; else ``max(to_cache_dtype(float32(amax) / 448), smallest normal of the cache dtype)``
  (448: e4m3's largest finite; the floor keeps the scale from rounding to zero for tiny tokens).
  Two bytes at fp16/bf16: with fp32 scales K0.7V0.7 would hold 59/256 = 0.230 of fp16 dense (issue
  target: at most 0.23), with fp16 scales 57/256 = 0.223; and a scale in the cache dtype has the range
  of the data it scales, so it never overflows (an fp16 scale of a bf16 cache could).
- ``q = e4m3(clamp(float32(x) / float32(scale), -448, 448))``, rounded to nearest even
  (``x / 1`` where ``scale == 0``: all-zero tokens store zeros).
- dequantised: ``to_cache_dtype(clamp(float32(q) * float32(scale), -max, max))``, ``max`` the cache dtype's
  largest finite (the product can pass it by the scale's rounding only).
- **non-finite inputs**: if any kept value is NaN or +-inf, the scale is NaN; the token then dequantises to
  NaN at its kept channels (its pruned channels stay 0), so attention over it gives NaN, as a NaN in a
  dense cache would. No error is raised: checking would synchronise the host on every decode step.

Every backend (reference, Triton) computes exactly this, bit for bit.
"""

from __future__ import annotations

import torch

from ._checks import CACHE_DTYPES

__all__ = ["E4M3_MAX", "FP8_DTYPE", "FP8_NAMES", "check_kept_dtype", "is_fp8", "quantize_kept", "dequantize_kept",
           "kept_itemsize", "scale_itemsize"]

#: The FP8 kept dtype (``None`` where this torch build lacks it).
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
#: Names that ``kept_dtype`` also accepts for FP8 (the settings' ``-fp8`` suffix uses them).
FP8_NAMES = ("fp8", "float8_e4m3fn", "torch.float8_e4m3fn")
#: e4m3's largest finite value: the largest kept magnitude of a token maps to it.
E4M3_MAX = 448.0


def is_fp8(dtype: torch.dtype | None) -> bool:
    """Whether ``dtype`` is the FP8 kept dtype."""
    return FP8_DTYPE is not None and dtype == FP8_DTYPE


def check_kept_dtype(kept_dtype: object, cache_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """``kept_dtype`` checked: ``None`` (the cache dtype), the cache dtype, ``torch.float8_e4m3fn`` or "fp8".

    Returns ``FP8_DTYPE`` for FP8, else ``None`` (kept values in the cache dtype). With ``cache_dtype`` None
    (not known yet, e.g. a cache before its first update), any cache dtype (fp16/bf16/fp32) is returned as
    given, to be checked again against the states' dtype.

    Raises:
        TypeError: anything else (``torch.int8``, ``torch.float8_e5m2``, a string, a dtype other than the
            cache dtype), or FP8 asked for on a torch build without ``float8_e4m3fn``.
    """
    if kept_dtype is None or (cache_dtype is not None and kept_dtype == cache_dtype):
        return None
    if isinstance(kept_dtype, torch.dtype) and is_fp8(kept_dtype):
        return FP8_DTYPE
    if isinstance(kept_dtype, str) and kept_dtype in FP8_NAMES:
        if FP8_DTYPE is None:
            raise TypeError(f"kept_dtype={kept_dtype!r} needs a torch build with torch.float8_e4m3fn (torch "
                            f"{torch.__version__} lacks it)")
        return FP8_DTYPE
    if cache_dtype is None and kept_dtype in CACHE_DTYPES:
        return kept_dtype
    cache = "the cache dtype" if cache_dtype is None else f"the cache dtype {cache_dtype}"
    raise TypeError(f"kept_dtype must be None ({cache}) or torch.float8_e4m3fn, got "
                    f"{kept_dtype!r} ({type(kept_dtype).__name__})")


def kept_itemsize(kept_dtype: torch.dtype | None, cache_dtype: torch.dtype) -> int:
    """Bytes of one kept value: 1 for FP8, else the cache dtype's size."""
    return 1 if is_fp8(kept_dtype) else torch.empty((), dtype=cache_dtype).element_size()


def scale_itemsize(kept_dtype: torch.dtype | None, cache_dtype: torch.dtype) -> int:
    """Bytes of the scale of one token-head: the cache dtype's size for FP8, else 0 (no scale)."""
    return torch.empty((), dtype=cache_dtype).element_size() if is_fp8(kept_dtype) else 0


def quantize_kept(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept values ``[..., k_keep]`` (fp16/bf16/fp32) -> ``(q [..., k_keep] float8_e4m3fn, scales [...])``.

    ``scales`` in ``values``' dtype; the rule of the module docstring.
    """
    if values.dtype not in CACHE_DTYPES:
        raise TypeError(f"values must be float16, bfloat16 or float32, got {values.dtype}")
    amax = values.abs().amax(dim=-1) if values.shape[-1] else values.new_zeros(values.shape[:-1])
    finfo = torch.finfo(values.dtype)
    amax32 = amax.float()
    # a tensor divisor: torch divides by a Python number through its reciprocal on CUDA (1 ulp off the rule's
    # correctly rounded quotient at times, measured on an H200), and the kernels divide exactly
    scale = (amax32 / torch.full_like(amax32, E4M3_MAX)).to(values.dtype)
    scale = torch.where(amax == 0, torch.zeros_like(scale), torch.clamp(scale, min=finfo.tiny))
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float().unsqueeze(-1)
    q = torch.clamp(values.float() / divisor, -E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_kept(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``q [..., k_keep]`` float8_e4m3fn and ``scales [...]`` -> values ``[..., k_keep]`` in ``scales``' dtype."""
    limit = torch.finfo(scales.dtype).max
    product = q.float() * scales.float().unsqueeze(-1)
    return torch.clamp(product, -limit, limit).to(scales.dtype)
