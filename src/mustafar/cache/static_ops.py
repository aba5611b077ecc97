"""Graph-capturable decode operations over a preallocated (static) compressed cache.

The static layout (see :class:`mustafar.StaticMustafarCache`): per layer a
:class:`~mustafar.format.BitmapKV` store whose whole capacity is allocated up
front, a dense **ring** of ``w`` slots for the local window (token ``t`` in slot
``t % w``), and the number of tokens held as a device int64 scalar ``length``.
With ``length = n``: tokens ``0 .. n - w - 1`` are in the store (rows in token
order), the last ``min(n, w)`` in the ring. Every function here reads the counts
on the device: no host synchronisation and no shape that depends on ``n``, so a
decode step can be captured in a CUDA graph and replayed as ``n`` grows.

Attention over the ring in slot order is the same attention (a softmax over a
set of keys does not depend on their order), and one query token sees every
token held. Source of the method: Mustafar, arXiv 2505.22913.
"""

from __future__ import annotations

import torch

from .._checks import check_scale, check_tensor
from ..backends import pick
from ..format import BitmapKV

__all__ = ["static_decode_attention", "static_evict"]


def _check_static(query: torch.Tensor, store: BitmapKV, ring: torch.Tensor, length: torch.Tensor) -> None:
    check_tensor("query", query, ndim=4)
    check_tensor("ring", ring, ndim=4)
    if query.shape[2] != 1:
        raise ValueError(f"static decode attention takes one query token, got q_len={query.shape[2]}")
    if ring.shape[2] < 1 or ring.shape[:2] != store.shape[:2] or ring.shape[3] != store.head_dim:
        raise ValueError(f"ring must be [{store.shape[0]}, {store.shape[1]}, w >= 1, {store.head_dim}], "
                         f"got {tuple(ring.shape)}")
    if not isinstance(length, torch.Tensor) or length.dtype != torch.int64 or length.numel() != 1:
        raise TypeError(f"length must be a one-element int64 tensor, got {getattr(length, 'dtype', type(length))}")


def static_decode_attention(
    query: torch.Tensor,
    key_store: BitmapKV,
    value_store: BitmapKV,
    key_ring: torch.Tensor,
    value_ring: torch.Tensor,
    length: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one query token over a static compressed cache, counts read on the device.

    Args:
        query: ``[batch, q_heads, 1, head_dim]``, fp16/bf16/fp32.
        key_store, value_store: stores allocated for the whole sequence (their ``tokens`` is ignored).
        key_ring, value_ring: ``[batch, kv_heads, w, head_dim]``, the local window as a ring buffer.
        length: int64 scalar tensor on the query's device: tokens held, the current one included.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: ``"auto"`` (the CUDA kernel where it applies, else the reference), ``"cuda"`` or ``"torch"``
            (``"triton"`` has no static form and serves as ``"auto"`` does; :mod:`mustafar.backends`).
            FP8 kept values: the CUDA kernel on compute capability >= 8.9, else the reference.

    Returns:
        ``[batch, q_heads, 1, head_dim]`` in the query's dtype; zeros while ``length`` is 0 (no key
        visible: the rule of :func:`mustafar.sparse_decode_attention` for fully masked rows).

    Raises:
        ValueError / TypeError: shapes, dtypes or ``length`` not as above.
        UnsupportedHardwareError: ``backend="cuda"`` for inputs the CUDA kernel cannot serve.
    """
    _check_static(query, key_store, key_ring, length)
    scale = query.shape[-1] ** -0.5 if scale is None else check_scale(scale)
    return pick("static_decode", backend, query=query, key_cache=key_store, value_cache=value_store,
                key_window=key_ring).static_decode(query, key_store, value_store, key_ring, value_ring, scale, length)


def static_evict(ring: torch.Tensor, store: BitmapKV, length: torch.Tensor, backend: str = "auto") -> None:
    """Before the token at position ``length`` enters the ring, compress the one it overwrites.

    The token ``length - w`` (ring slot ``length % w``) goes, pruned, to store row
    ``length - w``; nothing happens while ``length < w``, nor past the store's capacity (the
    caller must not decode more than ``max_tokens``). Decided on the device. ``backend`` as for
    :func:`static_decode_attention`.

    Raises:
        UnsupportedHardwareError: ``backend="cuda"`` for a ring the CUDA kernel cannot compress.
    """
    values, bitmaps = store.storage
    pick("static_evict", backend, x=ring, values=values, bitmaps=bitmaps).static_evict(ring, store, length)
