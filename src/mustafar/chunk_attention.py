"""Attention of a chunk of queries over a cache that already holds earlier tokens (chunked prefill).

Shared by the static caches (:class:`mustafar.DenseStaticCache`,
:class:`mustafar.StaticMustafarCache`) so that their chunked prefills do the same
attention work: ``n`` queries, the last ``n`` of ``t`` keys, causal aligned to the
lower right (query ``i`` sees keys ``0 .. t - n + i``), grouped-query heads read
without repeating K and V where SDPA's flash kernel serves them, and no mask
tensor (``torch.nn.attention.bias.causal_lower_right``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ._checks import check_tensor

__all__ = ["chunk_attention"]

#: Dtypes SDPA's flash kernel takes (it reads GQA heads natively; others get K and V repeated).
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def chunk_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``n`` positions over all ``t`` keys.

    Args:
        query: ``[batch, q_heads, n, head_dim]``, the chunk's queries (positions ``t - n .. t - 1``).
        keys, values: ``[batch, kv_heads, t, head_dim]``, every token held, the chunk's own last;
            ``q_heads`` a multiple of ``kv_heads``. Last dimension contiguous.
        scale: softmax scale.

    Returns:
        ``[batch, q_heads, n, head_dim]`` in the query's dtype.

    Raises:
        ValueError: ranks, head counts or lengths that do not fit together (``n > t``).
    """
    check_tensor("query", query, ndim=4)
    check_tensor("keys", keys, ndim=4)
    n, t = query.shape[2], keys.shape[2]
    if n > t or query.shape[1] % keys.shape[1] or values.shape != keys.shape:
        raise ValueError(f"query [b, q_heads, n, d] must have n <= t and q_heads a multiple of kv_heads over "
                         f"keys/values [b, kv_heads, t, d]; got {tuple(query.shape)}, {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    group = query.shape[1] // keys.shape[1]
    if group > 1 and query.is_cuda and query.dtype in _FLASH_DTYPES:
        try:
            return _sdpa(query, keys, values, scale)
        except RuntimeError:  # no flash kernel for these inputs: the fallbacks do not read GQA heads
            pass
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    return _sdpa(query, keys, values, scale)


def _sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    n, t = query.shape[2], keys.shape[2]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(n, t), scale=scale,
                                          enable_gqa=query.shape[1] != keys.shape[1])
