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

#: What torch's FlashAttention-2 kernel takes (it reads GQA heads natively; elsewhere K and V are repeated).
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ALIGN, _FLASH_MAX_HEAD_DIM = 8, 256


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
    if query.is_cuda and query.dtype in _FLASH_DTYPES and query.shape[-1] % _FLASH_ALIGN == 0 \
            and query.shape[-1] <= _FLASH_MAX_HEAD_DIM:
        try:  # FlashAttention-2: bottom-right causal alignment, GQA heads read natively
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, keys, values, 0.0, is_causal=True, return_debug_mask=False, scale=scale)[0]
        except RuntimeError:  # not built for this GPU or these inputs: the portable path below
            pass
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(n, t), scale=scale)
