"""Launcher of the dense static cache's one-launch decode write (:mod:`mustafar.kernels.dense_write`)."""

from __future__ import annotations

import torch

from ..kernels.dense_write import dense_write_kernel
from .common import cdiv, next_pow2, on_device

__all__ = ["dense_write"]

#: (batch, KV head) rows per program, at most: as many as warps (4), so a row's reductions can stay in one warp, and
#: a batch-1 step (8 rows) still spreads over two programs.
BLOCK_ROWS = 4


def dense_write(keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                length: torch.Tensor, counter: torch.Tensor, advance: bool = True) -> None:
    """Write one token into ``keys`` / ``values`` ``[batch, kv_heads, max_tokens, head_dim]`` at ``length``.

    Args:
        key_states, value_states: ``[batch, kv_heads, 1, head_dim]``, the buffers' dtype, rows contiguous.
        length: int64 one-element device tensor (the position; advanced by one with ``advance``).
        counter: int32 one-element device tensor, 0 between launches (the kernel resets it).

    Raises:
        ValueError: shapes, dtypes or layouts that do not fit together.
    """
    b, h, _, d = keys.shape
    for name, tensor in (("key_states", key_states), ("value_states", value_states)):
        if tuple(tensor.shape) != (b, h, 1, d) or tensor.dtype != keys.dtype or tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be [{b}, {h}, 1, {d}] {keys.dtype} with contiguous rows, got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
    if values.shape != keys.shape or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"keys and values must be alike with contiguous rows, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    rows = b * h
    block = min(BLOCK_ROWS, next_pow2(rows))
    with on_device(keys):
        dense_write_kernel[(cdiv(rows, block),)](
            keys, *keys.stride()[:3], values, *values.stride()[:3], key_states, key_states.stride(0),
            key_states.stride(1), value_states, value_states.stride(0), value_states.stride(1), length, counter,
            h, rows, D=d, DP=max(16, next_pow2(d)), BLOCK_R=block, ADVANCE=advance, num_warps=4,
        )
