"""The ops layer: check inputs, ask the backend table, allocate, launch.

Backends (:mod:`mustafar.backends`, the one table and dispatcher): ``"torch"`` (the PyTorch reference of
:mod:`mustafar.reference`, any device), ``"triton"`` (the kernels of :mod:`mustafar.kernels`, CUDA
tensors, or the CPU under ``TRITON_INTERPRET=1``) and ``"cuda"`` (the CUDA C++ kernels of ``csrc/``,
compiled at first use; fp16/bf16, head_dim 64 or 128, up to 16 query rows per KV head). ``"auto"`` picks
the first of CUDA, Triton, reference that serves the inputs (Triton and CUDA only for CUDA tensors);
:func:`mustafar.resolve_backend` names it.

FP8 kept values (stores with ``kept_dtype=torch.float8_e4m3fn``, :mod:`mustafar.fp8`) are served by every
backend: the CUDA kernels compress into them and decode them (decode on compute capability >= 8.9; below
it ``"auto"`` decodes them with Triton and ``"cuda"`` raises :class:`UnsupportedHardwareError`).
"""

from __future__ import annotations

import torch

from ._checks import check_head_dim, check_positive_int, check_scale, check_tensor
from .backends import BACKENDS, UnsupportedHardwareError, available_backends, pick, triton_available
from .format import BitmapKV, num_words
from .fp8 import FP8_DTYPE, is_fp8
from .pruning import keep_count

__all__ = ["sparse_decode_attention", "compress", "compress_into", "append", "BACKENDS", "UnsupportedHardwareError",
           "available_backends", "triton_available"]

def compress_into(
    x: torch.Tensor, sparsity: float, values: torch.Tensor, bitmaps: torch.Tensor, offset: int, backend: str = "auto",
    scales: torch.Tensor | None = None,
) -> None:
    """Prune and compress ``x [b, h, n, d]`` into ``values[:, :, offset:offset+n]`` and ``bitmaps[...]`` in place.

    ``values``: ``[b, h, capacity, k_keep]`` of ``x``'s dtype and ``bitmaps``: ``[b, h, capacity, ceil(d/64)]``
    int64 (a store's :attr:`~mustafar.format.BitmapKV.storage`), rows contiguous, on ``x``'s device;
    ``0 <= offset`` and ``offset + n <= capacity``. FP8 kept values: ``values`` of dtype ``float8_e4m3fn``
    and ``scales [b, h, capacity]`` of ``x``'s dtype (:attr:`~mustafar.format.BitmapKV.scale_storage`), the
    rule of :mod:`mustafar.fp8`. Backends as for :func:`sparse_decode_attention`; all give identical bits.

    Raises:
        TypeError / ValueError: any of the above not met.
        UnsupportedHardwareError: ``backend="cuda"`` for inputs the CUDA kernel cannot serve.
    """
    _check_compress_inputs(x, sparsity, values, bitmaps, offset, scales)
    n = x.shape[2]
    out_values, out_bitmaps = values[:, :, offset : offset + n], bitmaps[:, :, offset : offset + n]
    out_scales = None if scales is None else scales[:, :, offset : offset + n]
    pick("compress", backend, x=x, values=out_values, bitmaps=out_bitmaps).compress(x, sparsity, out_values,
                                                                                     out_bitmaps, out_scales)


def append(store: BitmapKV, x: torch.Tensor, backend: str = "auto") -> None:
    """Prune (per token) and compress new rows ``x [batch, kv_heads, n, head_dim]`` onto ``store``'s end.

    What :meth:`BitmapKV.append` does, with the compression run by ``backend`` (:mod:`mustafar.backends`;
    every backend writes identical bits): the caches call this one.

    Raises:
        TypeError / ValueError: ``x`` of another dtype, device, batch, head count or head_dim than ``store``.
        UnsupportedHardwareError: an explicit ``backend`` that cannot compress ``x``.
    """
    store.check_rows(x)
    start = store.tokens
    store.reserve(start + x.shape[2])
    values, bitmaps = store.storage
    compress_into(x, store.sparsity, values, bitmaps, start, backend, scales=store.scale_storage)
    store.advance(x.shape[2])


def compress(x: torch.Tensor, sparsity: float, kept_dtype: torch.dtype | None = None,
             backend: str = "auto") -> BitmapKV:
    """Per-token prune ``x`` ``[batch, kv_heads, tokens, head_dim]`` and store it as a :class:`BitmapKV`.

    ``x``: fp16, bf16 or fp32, any head_dim in 1..256. ``sparsity``: fraction of
    each token's entries zeroed, in [0, 1). ``compress(x, s).decompress()``
    equals ``prune_per_token(x, s)`` exactly, whichever ``backend`` compresses. Source: Mustafar, arXiv 2505.22913.

    ``kept_dtype``: ``None`` or ``x.dtype`` (default: kept values in ``x``'s dtype) or ``torch.float8_e4m3fn``
    (kept values in e4m3, one scale per token and head: ``scale = max kept |x| / 448``, the rule of
    :mod:`mustafar.fp8`); the bitmap is the same, and ``decompress()`` returns ``x``'s dtype.

    Raises:
        TypeError: ``x`` not a tensor of a cache dtype; an unsupported ``kept_dtype``.
        ValueError: wrong rank, head_dim over 256, sparsity outside [0, 1).
    """
    check_tensor("x", x, ndim=4)
    check_head_dim("x", x.shape[-1])
    b, h, t, d = x.shape
    store = BitmapKV.empty(b, h, d, sparsity, dtype=x.dtype, device=x.device, capacity=t, kept_dtype=kept_dtype)
    if t:
        append(store, x, backend)
    return store


def _check_compress_inputs(x, sparsity, values, bitmaps, offset, scales=None) -> None:
    check_tensor("x", x, ndim=4)
    b, h, n, d = x.shape
    check_head_dim("x", d)
    k_keep = keep_count(d, sparsity)
    check_tensor("values", values, ndim=4, dtypes=(x.dtype,) if scales is None else (FP8_DTYPE,))
    if scales is not None:
        check_tensor("scales", scales, ndim=3, dtypes=(x.dtype,))
        if scales.shape != values.shape[:3] or scales.device != x.device or scales.stride(-1) != 1:
            raise ValueError(f"scales must be {tuple(values.shape[:3])}, contiguous, on {x.device}, got "
                             f"{tuple(scales.shape)} on {scales.device}")
    elif is_fp8(values.dtype):
        raise TypeError("scales must be given with float8_e4m3fn values, got None")
    check_tensor("bitmaps", bitmaps, ndim=4, dtypes=(torch.int64,))
    if values.shape[:2] != (b, h) or values.shape[3] != k_keep or bitmaps.shape != values.shape[:3] + (
            num_words(d),):
        raise ValueError(f"values must be [{b}, {h}, capacity, {k_keep}] and bitmaps [{b}, {h}, capacity, "
                         f"{num_words(d)}], got {tuple(values.shape)} and {tuple(bitmaps.shape)}")
    if values.device != x.device or bitmaps.device != x.device:
        raise ValueError(f"values and bitmaps must be on x's device {x.device}, got {values.device}, {bitmaps.device}")
    if values.stride(-1) != 1 or bitmaps.stride(-1) != 1:
        raise ValueError("values and bitmaps must have contiguous rows (last stride 1)")
    offset = check_positive_int("offset", offset, minimum=0)
    if offset + n > values.shape[2]:
        raise ValueError(f"offset + tokens must fit the capacity {values.shape[2]}, got offset {offset} + {n} tokens")


def _check_attention_inputs(query, key_cache, value_cache, key_window, value_window, attention_mask) -> None:
    check_tensor("query", query, ndim=4)
    for name, store in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(store, BitmapKV):
            raise TypeError(f"{name} must be a mustafar.BitmapKV, got {type(store).__name__}")
        if store.dtype != query.dtype:
            raise TypeError(f"{name} must have the query's dtype {query.dtype}, got {store.dtype}")
        if store.device != query.device:
            raise ValueError(f"{name} must be on the query's device {query.device}, got {store.device}")
    b, hq, lq, d = query.shape
    bk, hkv, tk, dk = key_cache.shape
    if (bk, dk) != (b, d):
        raise ValueError(f"key_cache must be [batch={b}, kv_heads, tokens, head_dim={d}], got {key_cache.shape}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache must have key_cache's shape {key_cache.shape}, got {value_cache.shape}")
    if hq % hkv != 0:
        raise ValueError(f"query's head count must be a multiple of kv_heads={hkv}, got q_heads={hq}")
    if (key_window is None) != (value_window is None):
        raise ValueError("key_window and value_window must be given together, got only one of them")
    window = 0
    if key_window is not None:
        for name, win in (("key_window", key_window), ("value_window", value_window)):
            check_tensor(name, win, ndim=4)
            if win.dtype != query.dtype:
                raise TypeError(f"{name} must have the query's dtype {query.dtype}, got {win.dtype}")
            if win.device != query.device:
                raise ValueError(f"{name} must be on the query's device {query.device}, got {win.device}")
            if win.shape[:2] != (b, hkv) or win.shape[3] != d or win.shape != key_window.shape:
                raise ValueError(f"{name} must be [{b}, {hkv}, w, {d}] like key_window, got {tuple(win.shape)}")
        window = key_window.shape[2]
    if lq < 1 or tk + window < lq:
        raise ValueError(f"query length must be in [1, cached tokens={tk + window}], got q_len={lq}")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=4, dtypes=None)
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            raise TypeError(
                f"attention_mask must be bool (True = attend) or an additive float, got {attention_mask.dtype}"
            )
        target = (b, hq, lq, tk + window)
        if any(m not in (1, n) for m, n in zip(attention_mask.shape, target, strict=True)):
            raise ValueError(f"attention_mask must broadcast to {list(target)}, got {tuple(attention_mask.shape)}")


def sparse_decode_attention(
    query: torch.Tensor,
    key_cache: BitmapKV,
    value_cache: BitmapKV,
    key_window: torch.Tensor | None = None,
    value_window: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a compressed KV cache plus an optional dense local window.

    Args:
        query: ``[batch, q_heads, q_len, head_dim]``, fp16/bf16/fp32; the queries
            are the last ``q_len`` tokens of the sequence (causal among them).
        key_cache, value_cache: :class:`BitmapKV` of logical shape
            ``[batch, kv_heads, tokens, head_dim]``, the query's dtype; the oldest tokens.
        key_window, value_window: ``[batch, kv_heads, w, head_dim]`` dense, the
            most recent tokens (after the compressed ones), or ``None``.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (:mod:`mustafar.backends`).
        attention_mask: optional, broadcastable to ``[batch, q_heads, q_len, tokens + w]``;
            bool (True = attend) or additive float; an additive entry of ``-inf`` or at most half
            its dtype's minimum (``torch.finfo(dtype).min``, as transformers writes) masks its key.

    Returns:
        ``[batch, q_heads, q_len, head_dim]`` in the query's dtype; softmax in fp32.
        GQA: query head ``h`` reads KV head ``h // (q_heads // kv_heads)``. A **fully masked
        row** (no key visible after causality and the mask) gives **zeros** on every backend
        (reference, Triton, CUDA), as FlashAttention does (issue 17).

    Raises:
        TypeError: non-tensor or non-BitmapKV inputs, dtype mismatches, an
            ``attention_mask`` neither bool nor floating.
        ValueError: shape mismatches, q_heads not a multiple of kv_heads, bad backend.
        UnsupportedHardwareError: an explicit ``backend`` that cannot serve the inputs.

    Source: Mustafar (arXiv 2505.22913) computes attention directly on the
    pruned cache; this is its decode step in flash-decoding form.
    """
    _check_attention_inputs(query, key_cache, value_cache, key_window, value_window, attention_mask)
    scale = query.shape[-1] ** -0.5 if scale is None else check_scale(scale)
    if query.shape[0] == 0:  # an empty batch: nothing to attend
        return torch.empty_like(query)
    return decode_attention_unchecked(query, key_cache, value_cache, key_window, value_window, scale, backend,
                                      attention_mask)


def decode_attention_unchecked(query, key_cache, value_cache, key_window, value_window, scale: float, backend: str,
                               attention_mask) -> torch.Tensor:
    """:func:`sparse_decode_attention` without its input checks, for callers whose inputs hold by construction.

    Arguments, shapes, dtypes and the result as for :func:`sparse_decode_attention`; invalid inputs are
    not detected here (they give a kernel error or a wrong result), so public callers use that function.

    ``MustafarLayer`` calls it once per layer and decode step, where eager decoding at small batch is
    bound by host time (the checks cost about 10 us a call); ``scale`` must be a float, the batch non-empty.
    """
    return pick("decode", backend, query=query, key_cache=key_cache, value_cache=value_cache, key_window=key_window,
                attention_mask=attention_mask).decode(query, key_cache, value_cache, key_window, value_window, scale,
                                                      attention_mask)
