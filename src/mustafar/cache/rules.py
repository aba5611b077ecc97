"""The rules of :class:`~mustafar.MustafarCache`: which tokens are pruned, padding, crops. Pure functions.

Source: Mustafar (Joo et al., arXiv 2505.22913) keeps the most recent tokens
dense (the local window) and prunes every older one per token. This module
states, for a cache row of ``total`` tokens of which the first ``pads`` are left
padding, where its **boundary** lies: the tokens before it are attended pruned,
the tokens after it dense. With ``real = total - pads`` real tokens::

    boundary = pads + max(0, (real - window) // chunk) * chunk

i.e. the pads (masked anyway) and the largest multiple of ``chunk`` real tokens
that leaves at least ``window`` of them dense. A row's boundary depends only on
its own real tokens, so a left-padded prompt is pruned exactly as it is alone.

A layer moves whole tokens from its dense window to its compressed store
(rectangular over the batch), never past the smallest boundary of its rows, and
the attention prunes, on the fly, window tokens that lie before a row's boundary
(:func:`prune_rows_prefix`). What the attention reads is therefore always the rule
above, however far the store lags behind (padded rows, past recording).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pruning import prune_per_token
from ..reference import prune_kept_reference

__all__ = ["boundaries", "crop_limit", "pads_from_mask", "prune_rows_prefix", "query_blocks"]


def boundaries(total: int, pads: Sequence[int], window: int, chunk: int) -> list[int]:
    """Per row: the number of leading tokens attended pruned (pads included) when the row holds ``total``.

    Pads beyond ``total`` (after a crop into them) count as ``total``.
    """
    return [min(p, total) + max(0, (total - p - window) // chunk) * chunk for p in pads]


def query_blocks(old: int, n: int, pads: Sequence[int], window: int, chunk: int) -> list[tuple[int, int]]:
    """Runs ``(start, stop)`` of the ``n`` queries of a step after ``old`` tokens, each of one set of boundaries.

    Query ``i`` is token ``old + i``: token-by-token decoding would attend it over ``old + i + 1``
    tokens, with each row pruned up to ``boundaries(old + i + 1, ...)`` (issue 17: a multi-token step,
    e.g. the verification of speculative candidates, must show each query what token-by-token decoding
    would). A row's boundary moves where its real tokens reach ``window + k * chunk`` (``k >= 1``), and
    at every token while the row is still padding; the runs split the queries there. One run when no
    boundary moves inside the step (with the default chunk of 256, nearly always).
    """
    cuts = {0, n}
    for p in pads:
        cuts.update(range(1, min(p, old + n) - old))  # still padding: the boundary follows every token
        first = max(1, -(-(old + 2 - p - window) // chunk))  # smallest k whose total old + 1 + i has i >= 1
        cuts.update(range(p + window + first * chunk - old - 1, n, chunk))
    points = sorted(cuts)
    return list(zip(points[:-1], points[1:]))


def crop_limit(stored: int, total: int, pads: Sequence[int], window: int, chunk: int) -> int:
    """The most tokens a crop may remove from ``total`` while ``stored`` stays within every row's boundary.

    A crop to ``keep`` tokens is exact iff ``min(stored, keep) <= min(boundaries(keep))``: no token the
    rule keeps dense at ``keep`` was pruned. Boundaries grow with ``keep``, so the exact crops are
    ``keep == 0`` and ``keep`` at or above a threshold, found by bisection.
    """
    if stored == 0:
        return total
    low, high = stored, total  # min(boundaries(total)) >= stored holds for any state the cache reaches
    while low < high:
        mid = (low + high) // 2
        if min(boundaries(mid, pads, window, chunk)) >= stored:
            high = mid
        else:
            low = mid + 1
    return total - low


def pads_from_mask(attention_mask: torch.Tensor | None, batch: int, tokens: int) -> list[int]:
    """Left padding per row, read from the 4-d mask of a prefill of ``tokens`` tokens on an empty cache.

    A token is padding iff it may not attend to itself (the mask's diagonal is False, or -inf / the
    dtype's minimum for an additive float mask); bool ``[batch or 1, heads or 1, tokens, kv >= tokens]``.
    Only a row's leading padding shifts its boundary; masked tokens after its first real token (right
    padding, or a pad id inside a prompt) stay masked by the attention and count as tokens for the rule.

    Raises:
        ValueError: a mask of another shape.
    """
    if attention_mask is None:
        return [0] * batch
    if attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[-2] != tokens \
            or attention_mask.shape[-1] < tokens:
        raise ValueError(f"attention_mask must be [batch={batch} or 1, heads, q_len={tokens}, kv >= {tokens}] for a "
                         f"prefill of {tokens} tokens, got {tuple(attention_mask.shape)}")
    diagonal = attention_mask[:, 0, :, :tokens].diagonal(dim1=-2, dim2=-1)
    if diagonal.dtype != torch.bool:
        diagonal = diagonal > torch.finfo(diagonal.dtype).min / 2
    padding = ~diagonal.expand(batch, tokens).cpu()
    return padding.long().cumprod(dim=-1).sum(dim=-1).tolist()


def prune_rows_prefix(window: torch.Tensor, lags: Sequence[int], sparsity: float, fp8: bool = False) -> torch.Tensor:
    """``window [b, h, w, d]`` with its first ``lags[row]`` tokens of each row pruned per token.

    ``fp8``: their kept values also quantised to e4m3 and back (what an FP8 store holds, :mod:`mustafar.fp8`).
    Returns ``window`` itself when nothing is to be pruned (all lags 0, or sparsity 0 without ``fp8``).
    """
    longest = max(lags, default=0)
    if longest == 0 or (sparsity == 0.0 and not fp8):
        return window
    head = window[:, :, :longest]
    pruned = prune_kept_reference(head, sparsity, fp8=True) if fp8 else prune_per_token(head, sparsity)
    if min(lags) != longest:
        lag = torch.tensor(list(lags), device=window.device).view(-1, 1, 1, 1)
        position = torch.arange(longest, device=window.device).view(1, 1, -1, 1)
        pruned = torch.where(position < lag, pruned, head)
    return torch.cat([pruned, window[:, :, longest:]], dim=2)
