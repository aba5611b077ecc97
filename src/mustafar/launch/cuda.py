"""Launcher of the CUDA C++ decode kernel (``csrc/decode.cu``), compiled at first use.

The extension is built with ``torch.utils.cpp_extension.load`` (nvcc and ninja
needed; about a minute, cached in ``TORCH_EXTENSIONS_DIR``). It serves fp16/bf16
caches with head_dim 64 or 128 and up to 16 query rows per KV head
(``group * q_len``), kept values in the cache dtype or, on compute capability
>= 8.9, FP8 e4m3 with per-token scales (issue 15: the K scale multiplies the
scores, the V scale the softmax weights, so the expansion only converts
e4m3 to fp16/bf16); :func:`cuda_supported` says whether a call qualifies, and
the ops layer falls back to Triton otherwise.
"""

from __future__ import annotations

import functools
import os

import torch

from ..format import BitmapKV
from ..fp8 import is_fp8
from .common import LOG2E, cdiv, choose_splits

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
#: Head dims the CUDA kernel is compiled for.
HEAD_DIMS = (64, 128)
#: Query rows per KV head one CTA holds.
MAX_ROWS = 16
#: Tokens per CTA step (4 warps x 16) and the capacity granule the kernel stages whole.
CTA_TOKENS = 64
#: Fewest tokens the split heuristic gives one split (two CTA steps): at 1 x 4k (Llama-3-8B shape, s = 0.7, H200,
#: ``benchmarks/probes/batch1_splits.py``, 2026-12-03) 32 splits of 128 tokens took 14.0 us against 17.9 us for 64
#: splits of 64; batch >= 8 and 32k contexts choose the same splits as before.
MIN_SPLIT_TOKENS = 2 * CTA_TOKENS
TILE_TOKENS = 16
_WORKSPACE_ROWS = 16


@functools.lru_cache(maxsize=None)
def load_extension():
    """Compile (once per machine) and import the CUDA extension."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}a" if major >= 9 else f"{major}{minor}"
    flags = ["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"]
    return load(
        name=f"mustafar_cuda_sm{arch}",
        sources=[os.path.join(_CSRC, name) for name in ("binding.cpp", "decode.cu", "compress.cu")],
        extra_cuda_cflags=flags,
        extra_include_paths=[_CSRC],
        verbose=os.environ.get("MUSTAFAR_VERBOSE_BUILD") == "1",
    )


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """Whether a CUDA device of compute capability >= 8.0 is present (the kernel uses mma.sync and cp.async)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _rows_ok(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.stride(2) == x.shape[-1] and x.data_ptr() % 16 == 0


#: Compute capability the FP8 decode needs (the e4m3x2 -> f16x2 conversion instruction).
FP8_CAPABILITY = (8, 9)


@functools.lru_cache(maxsize=None)
def fp8_available() -> bool:
    """Whether the CUDA decode kernel can read FP8 kept values here (compute capability >= 8.9)."""
    return cuda_available() and torch.cuda.get_device_capability() >= FP8_CAPABILITY


def _scales_ok(scales: torch.Tensor, dtype: torch.dtype) -> bool:
    """Scales ``[b, h, capacity]`` the kernel stages 16 at a time: query dtype, tokens contiguous, 16-byte rows."""
    size = scales.element_size()
    return (scales.dtype == dtype and scales.stride(2) == 1 and scales.data_ptr() % 16 == 0
            and (scales.stride(1) * size) % 16 == 0 and (scales.stride(0) * size) % 16 == 0)


def cuda_supported(query, key_cache: BitmapKV, value_cache: BitmapKV, key_window, attention_mask) -> bool:
    """Whether the CUDA kernel can serve this call (else the caller uses Triton)."""
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] in HEAD_DIMS):
        return False
    rows = query.shape[1] // key_cache.shape[1] * query.shape[2]
    if rows > MAX_ROWS or query.stride(-1) != 1:
        return False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return False
    if key_window is not None and key_window.stride(-1) != 1:
        return False
    if key_cache.is_fp8 != value_cache.is_fp8 or (key_cache.is_fp8 and not fp8_available()):
        return False
    for store in (key_cache, value_cache):  # the whole buffers: same pointer and strides as the views of the tokens
        values, bitmaps = store.storage
        if store.capacity % TILE_TOKENS or not (_rows_ok(values) and _rows_ok(bitmaps)):
            return False
        if store.is_fp8 and not _scales_ok(store.scale_storage, query.dtype):
            return False
    return True


@functools.lru_cache(maxsize=None)
def ctas_per_sm(bf16: bool, head_dim: int, rows: int, masked: bool, k_keep: int, v_keep: int,
                fp8: bool = False) -> int:
    """Decode CTAs that fit on one multiprocessor at once (CUDA occupancy API); K and V keep k_keep / v_keep."""
    return max(1, load_extension().occupancy(bf16, head_dim, rows, masked, k_keep, v_keep, fp8))


def decode_attention_cuda(
    query: torch.Tensor,
    key_cache: BitmapKV,
    value_cache: BitmapKV,
    key_window: torch.Tensor | None,
    value_window: torch.Tensor | None,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the CUDA kernel; inputs checked by :func:`mustafar.sparse_decode_attention` and :func:`cuda_supported`.

    With ``length`` (a CUDA int64 scalar: tokens held), the stores' whole capacity is the compressed token axis and
    the kernel reads the counts from ``length`` on the device (``key_window`` is then a ring buffer of ``w`` slots):
    the static, graph-capturable decode step.
    """
    ext = load_extension()
    b, hq, lq, d = query.shape
    hkv = key_cache.shape[1]
    n_comp = key_cache.capacity if length is not None else key_cache.tokens
    if num_splits is None:
        rows = hq // hkv * lq
        per_sm = ctas_per_sm(query.dtype == torch.bfloat16, d, rows, attention_mask is not None, key_cache.k_keep,
                             value_cache.k_keep, key_cache.is_fp8)
        splits = choose_splits(b * hkv, n_comp, query.device, per_sm, MIN_SPLIT_TOKENS, whole_wave=True)
    else:
        splits = min(num_splits, n_comp)
    per_split = cdiv(cdiv(max(n_comp, 1), max(splits, 1)), CTA_TOKENS) * CTA_TOKENS
    splits = cdiv(n_comp, per_split) if n_comp else 0
    has_window = key_window is not None and key_window.shape[2] > 0
    parts = splits + int(has_window)
    # one workspace allocation (host time counts at small batch): partial outputs, then running max and sum
    rows_total = parts * b * hkv * _WORKSPACE_ROWS
    workspace = torch.empty(rows_total * (d + 2), device=query.device, dtype=torch.float32)
    part_o = workspace[: rows_total * d].view(parts, b * hkv, _WORKSPACE_ROWS, d)
    part_m = workspace[rows_total * d : rows_total * (d + 1)].view(parts, b * hkv, _WORKSPACE_ROWS)
    part_l = workspace[rows_total * (d + 1) :].view(parts, b * hkv, _WORKSPACE_ROWS)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    empty = query.new_empty(0)
    mask = empty
    if attention_mask is not None:
        mask = attention_mask.expand(b, hq, lq, n_comp + (key_window.shape[2] if has_window else 0))
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    # the whole buffers: the kernel reads n_comp rows (or the device-side length), with the views' strides
    (kv, kb), (vv, vb) = key_cache.storage, value_cache.storage
    ks = vs = empty
    if key_cache.is_fp8:  # e4m3 bits and the per-token scales
        kv, vv = kv.view(torch.uint8), vv.view(torch.uint8)
        ks, vs = key_cache.scale_storage, value_cache.scale_storage
    ext.decode(
        query, kv, kb.view(torch.int32), vv, vb.view(torch.int32), key_window if has_window else empty,
        value_window if has_window else empty, mask, part_o, part_m, part_l, out,
        n_comp, per_split, splits, scale * LOG2E, empty if length is None else length,
        key_window.shape[2] if has_window else 0, ks, vs,
    )
    return out


def compress_supported(x: torch.Tensor, values: torch.Tensor, bitmaps: torch.Tensor) -> bool:
    """Whether the CUDA compress kernel can serve ``x`` (else the caller uses Triton).

    ``values`` in ``x``'s dtype, or ``float8_e4m3fn`` (FP8 kept values, issue 15: the scales ``[b, h, n]`` must
    then have contiguous tokens, as :func:`mustafar.ops.compress_into` checks).
    """
    if not (cuda_available() and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    if x.shape[-1] not in HEAD_DIMS or x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(2) * 2) % 16:
        return False
    if values.dtype != x.dtype and not is_fp8(values.dtype):
        return False
    return values.stride(-1) == 1 and values.stride(2) == values.shape[-1] and bitmaps.stride(2) == bitmaps.shape[-1]


def compress_cuda(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmaps: torch.Tensor,
    position: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> None:
    """Run the CUDA prune + compress kernel (``k_keep`` from ``values``' last dim) into the given views.

    With ``position`` (a CUDA int64 scalar), ``x`` is a ring buffer of ``w`` slots and only the token in slot
    ``position % w`` is compressed, into row ``position - w`` of ``values``/``bitmaps`` (nothing while
    ``position < w``): the static decode step's eviction, decided on the device.

    With ``scales`` (``[b, h, n]`` of ``x``'s dtype, tokens contiguous; row ``position - w`` in the static form),
    ``values`` is ``float8_e4m3fn``: the kept values are written as e4m3 with one scale per token and head, the
    rule of :mod:`mustafar.fp8` (bit-identical to the reference).

    Raises:
        ValueError: ``scales`` given with ``values`` that are not ``float8_e4m3fn``, or the reverse, or
            ``scales`` whose tokens are not contiguous.
    """
    if (scales is not None) != is_fp8(values.dtype):
        raise ValueError(f"scales must be given exactly with float8_e4m3fn values, got values of {values.dtype} "
                         f"and scales {None if scales is None else tuple(scales.shape)}")
    if scales is not None and scales.stride(-1) != 1:
        raise ValueError(f"scales must have contiguous tokens (last stride 1), got strides {scales.stride()}")
    empty = x.new_empty(0, dtype=torch.int64)
    if scales is not None:
        values = values.view(torch.uint8)
    load_extension().compress(x, values, bitmaps.view(torch.int32), empty if position is None else position,
                              x.shape[2] if position is not None else 0, x.new_empty(0) if scales is None else scales)


__all__ = ["compress_cuda", "compress_supported", "cuda_available", "cuda_supported", "decode_attention_cuda",
           "fp8_available", "load_extension"]
