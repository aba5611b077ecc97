"""PyTorch references of every kernel: the CPU fallback and the test oracle.

Source of the method: Mustafar, arXiv 2505.22913. These functions favour
clarity over speed: the decode attention decompresses the whole cache.
"""

from __future__ import annotations

import torch

from .format import compress_rows, expand
from .fp8 import dequantize_kept, quantize_kept

__all__ = ["compress_reference", "decompress_reference", "decode_attention_reference", "masked_floor",
           "prune_kept_reference"]

#: An additive mask entry at or below this fraction of its dtype's ``finfo.min`` masks its key (issue 17):
#: transformers writes ``finfo(dtype).min`` for masked keys, a sum of two such entries clamps there too.
MASKED_FRACTION_OF_MIN = 0.5


def masked_floor(dtype: torch.dtype) -> float:
    """The largest additive mask value of floating ``dtype`` that masks its key: half of ``finfo(dtype).min``."""
    return torch.finfo(dtype).min * MASKED_FRACTION_OF_MIN


#: Per-token prune and compress ``x [..., head_dim]`` -> ``(values [..., k_keep], bitmaps [..., words])``;
#: the format owns the rule (:func:`mustafar.format.compress_rows`), this is its name among the references.
compress_reference = compress_rows


def prune_kept_reference(x: torch.Tensor, sparsity: float, fp8: bool) -> torch.Tensor:
    """``x [..., head_dim]`` pruned per token, and with ``fp8`` its kept values quantised to e4m3 and back.

    What a store of kept dtype FP8 (or the cache dtype) decompresses to, in ``x``'s dtype: the attention
    reads window tokens that the rule prunes through it, so they match the store bit for bit.
    """
    values, bitmaps = compress_reference(x, sparsity)
    if fp8:
        values = dequantize_kept(*quantize_kept(values))
    return expand(values, bitmaps, x.shape[-1])


def decompress_reference(values: torch.Tensor, bitmaps: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Dense ``[..., head_dim]`` tensor from ``values`` and ``bitmaps`` (zeros where pruned)."""
    return expand(values, bitmaps, head_dim)


def decode_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [b, q_heads, q_len, d]`` over dense ``keys``/``values`` ``[b, kv_heads, t, d]``.

    GQA: query head ``h`` reads KV head ``h // (q_heads // kv_heads)``. The last
    ``q_len`` keys are the queries' own tokens: query ``i`` sees keys up to
    position ``t - q_len + i`` (causal). ``attention_mask`` (optional),
    broadcastable to ``[b, q_heads, q_len, t]``: bool (True = attend) or additive
    float, whose entries at or below :func:`masked_floor` of its dtype (``-inf``,
    ``finfo.min``) mask their key. Softmax in fp32. **Fully masked rows** (no key
    visible after causality and the mask) give zeros, as FlashAttention does, not
    NaN (SDPA's math path) nor the mean of V: one rule on every backend (issue 17).
    Returns ``[b, q_heads, q_len, d]`` in the query's dtype.
    """
    b, hq, lq, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    q = query.float().reshape(b, hkv, hq // hkv, lq, d)
    scores = torch.einsum("bhgqd,bhtd->bhgqt", q, keys.float()) * scale
    positions = torch.arange(t, device=query.device)
    visible = positions[None, :] <= (t - lq + torch.arange(lq, device=query.device))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    if attention_mask is not None:
        mask = attention_mask.expand(b, hq, lq, t).reshape(b, hkv, hq // hkv, lq, t)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float().masked_fill(mask <= masked_floor(mask.dtype), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    out = torch.einsum("bhgqt,bhtd->bhgqd", probs, values.float())
    return out.reshape(b, hq, lq, d).to(query.dtype)
