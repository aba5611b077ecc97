"""Launcher of the fused decode bookkeeping kernel (:mod:`mustafar.kernels.bookkeeping`)."""

from __future__ import annotations

import torch

from ..format import BitmapKV, num_words
from ..kernels.bookkeeping import bookkeeping_kernel
from ..pruning import keep_count
from .common import cdiv, next_pow2, on_device

__all__ = ["fused_bookkeeping", "fused_supported"]

#: The launch shape: one (batch, KV head) row per program, one warp, K and V in two grid columns
#: (``KV_SPLIT``). Measured on the H200 (``benchmarks/probes/bookkeeping_latency.py``, 2026-12-03, sixth session):
#: 3.97 us a launch at batch 1 and 4.24 us at batch 24 (Llama-3-8B shape, 32k held), against 7.01 and 7.45 us with
#: the former 4 rows, 4 warps and one column; the serial per-row work (top-k passes, prefix counts) is what counts.
BLOCK_ROWS = 1
WARPS = 1
KV_SPLIT = 1
#: Head dims the kernel's one-tile rows take.
_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_supported(ring: torch.Tensor) -> bool:
    """Whether :func:`fused_bookkeeping` serves a ring like ``ring`` (dtype, head_dim, contiguous rows).

    The stores' kept values may be in the ring's dtype or FP8 (e4m3, issue 15): both are served.
    """
    return ring.dtype in _DTYPES and ring.shape[-1] <= _MAX_HEAD_DIM and ring.stride(-1) == 1


def fused_bookkeeping(key_states: torch.Tensor, value_states: torch.Tensor, key_ring: torch.Tensor,
                      value_ring: torch.Tensor, key_store: BitmapKV, value_store: BitmapKV, length: torch.Tensor,
                      counter: torch.Tensor, advance: bool = True) -> None:
    """One decode step's bookkeeping of a static layer in one launch; nothing read on the host.

    Equivalent to ``static_evict`` of K and V, the new token written into ring slot ``length % w``,
    and ``length += 1`` (the last only with ``advance``), with bit-identical stores: values, bitmaps
    and, for FP8 kept values, the e4m3 bits and the per-token scales (the rule of :mod:`mustafar.fp8`).

    Args:
        key_states, value_states: the new token ``[batch, kv_heads, 1, head_dim]``, the ring's dtype.
        key_ring, value_ring: ``[batch, kv_heads, w, head_dim]``, rows contiguous.
        key_store, value_store: the static stores (whole capacity allocated); kept values both in the
            ring's dtype or both FP8 (``float8_e4m3fn``, scales in the ring's dtype).
        length: int64 one-element device tensor, tokens held before this step.
        counter: int32 one-element device tensor, 0 between launches (the kernel resets it).
        advance: advance ``length`` (the step timer of the benchmark runs it without).

    Raises:
        ValueError: shapes or dtypes that do not fit together (FP8 and non-FP8 stores mixed included).
    """
    b, h, w, d = key_ring.shape
    for name, states in (("key_states", key_states), ("value_states", value_states)):
        if tuple(states.shape) != (b, h, 1, d) or states.dtype != key_ring.dtype or states.stride(-1) != 1:
            raise ValueError(f"{name} must be [{b}, {h}, 1, {d}] {key_ring.dtype} with contiguous rows, got "
                             f"{tuple(states.shape)} {states.dtype}")
    if value_ring.shape != key_ring.shape or not (fused_supported(key_ring) and fused_supported(value_ring)):
        raise ValueError(f"key_ring and value_ring must be alike, fp16/bf16/fp32, head_dim <= {_MAX_HEAD_DIM}, rows "
                         f"contiguous; got {tuple(key_ring.shape)} {key_ring.dtype} and {tuple(value_ring.shape)}")
    if length.dtype != torch.int64 or length.numel() != 1 or counter.dtype != torch.int32 or counter.numel() != 1:
        raise ValueError(f"length must be one int64 and counter one int32, got {length.dtype} {tuple(length.shape)} "
                         f"and {counter.dtype} {tuple(counter.shape)}")
    fp8 = key_store.is_fp8
    for name, store in (("key_store", key_store), ("value_store", value_store)):
        if store.is_fp8 != fp8 or store.dtype != key_ring.dtype:
            raise ValueError(f"key_store and value_store must both hold FP8 or both cache-dtype kept values, with "
                             f"the ring's dtype {key_ring.dtype}; got {name} of {store.dtype}, kept "
                             f"{store.kept_dtype}, and key_store kept {key_store.kept_dtype}")
    rows, args, constexprs = bookkeeping_args(key_states, value_states, key_ring, value_ring, key_store, value_store,
                                              length, counter, advance)
    block = min(BLOCK_ROWS, next_pow2(rows))
    with on_device(key_ring):
        bookkeeping_kernel[(cdiv(rows, block), 1 + KV_SPLIT)](*args, **constexprs, BLOCK_R=block, KV_SPLIT=KV_SPLIT,
                                                               num_warps=WARPS)


def bookkeeping_args(key_states, value_states, key_ring, value_ring, key_store, value_store, length, counter,
                     advance):
    """The launch of :func:`~mustafar.kernels.bookkeeping.bookkeeping_kernel` for the operands of
    :func:`fused_bookkeeping` (same arguments; checked there, not here), without ``BLOCK_R``, the grid and the warp
    count, which ``benchmarks/probes/bookkeeping_latency.py`` varies.

    Returns:
        ``(rows, args, constexprs)``: ``rows = batch * kv_heads`` (the grid covers them ``BLOCK_R`` at a time), the
        positional arguments (tensors, strides in elements, sizes) and the compile-time ones (a dict).
    """
    b, h, w, d = key_ring.shape
    fp8 = key_store.is_fp8
    k_vals, k_bits = key_store.storage
    v_vals, v_bits = value_store.storage
    k_bits, v_bits = k_bits.view(torch.int32), v_bits.view(torch.int32)
    if fp8:
        k_vals, v_vals = k_vals.view(torch.uint8), v_vals.view(torch.uint8)
        k_scales, v_scales = key_store.scale_storage, value_store.scale_storage
        k_scale_args, v_scale_args = (k_scales, *k_scales.stride()), (v_scales, *v_scales.stride())
    else:
        k_scale_args = v_scale_args = (key_ring, 0, 0, 0)  # unused
    rows = b * h
    args = (key_ring, *key_ring.stride()[:3], key_states, key_states.stride(0), key_states.stride(1),
            k_vals, *k_vals.stride()[:3], k_bits, *k_bits.stride()[:3], *k_scale_args,
            value_ring, *value_ring.stride()[:3], value_states, value_states.stride(0), value_states.stride(1),
            v_vals, *v_vals.stride()[:3], v_bits, *v_bits.stride()[:3], *v_scale_args,
            length, counter, h, rows, w, k_vals.shape[2],
            keep_count(d, key_store.sparsity), keep_count(d, value_store.sparsity))
    constexprs = dict(D=d, DP=max(16, next_pow2(d)), NW32=2 * num_words(d),
                      KEY_BITS=31 if key_ring.dtype == torch.float32 else 15, ADVANCE=advance, KEPT_FP8=fp8,
                      TINY=torch.finfo(key_ring.dtype).tiny if fp8 else 0.0)
    return rows, args, constexprs
