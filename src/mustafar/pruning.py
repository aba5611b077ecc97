"""Pruning rules for Key and Value vectors.

Source: Joo, Hosseini, Hadidi, Asgari, "Mustafar: Promoting Unstructured
Sparsity for KV Cache Pruning in LLM Inference", arXiv 2505.22913 (NeurIPS
2025). The paper's rule is **per-token magnitude pruning**: for every token and
head keep the ``k_keep = head_dim - floor(sparsity * head_dim)`` entries of
largest magnitude among the ``head_dim`` channels. Keys are pruned after RoPE.
The comparison rules of the paper (output-aware, per-channel, ThinK) live here
too, as small subclasses of :class:`PruningRule`, which owns the selection.

Only per-token rules (``storable=True``) keep the same number of entries in
every token and can be stored in the bitmap format (:mod:`mustafar.format`).
Per-channel and ThinK exist for accuracy studies: they zero entries but save no
memory.

Example::

    >>> import torch, mustafar
    >>> x = torch.randn(1, 2, 5, 8)
    >>> y = mustafar.prune_per_token(x, 0.5)
    >>> int((y != 0).sum(-1).max())
    4
"""

from __future__ import annotations

import math

import torch

from ._checks import check_head_dim, check_positive_int, check_sparsity, check_tensor

__all__ = [
    "PruningRule",
    "PerToken",
    "OutputAware",
    "PerChannel",
    "ThinK",
    "RULES",
    "get_rule",
    "keep_count",
    "topk_mask",
    "per_token_mask",
    "prune_per_token",
    "prune_output_aware",
    "prune_per_channel",
    "prune_think",
]


def keep_count(size: int, sparsity: float) -> int:
    """Number of entries kept out of ``size`` at ``sparsity``: ``size - floor(sparsity * size)``.

    ``sparsity`` is the fraction zeroed, in [0, 1) (a value within float32 round-off
    of a 6-decimal number, such as 0.699999988, counts as that number). The product
    is rounded to 9 decimals before the floor so that, e.g., ``0.7 * 10`` counts as 7;
    a non-empty row always keeps at least one entry (``sparsity < 1``), however close to 1.

    Raises:
        TypeError / ValueError: ``size`` not an int >= 0, or a bad ``sparsity``.
    """
    size = check_positive_int("size", size, minimum=0)
    sparsity = check_sparsity("sparsity", sparsity)
    return size - min(math.floor(round(sparsity * size, 9)), max(size - 1, 0))


def topk_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``scores`` along ``dim``; ties go to the lower index.

    NaN scores count as larger than every number (the order of ``torch.sort``),
    so the GPU kernels, which compare the bit patterns of ``|x|``, agree with it.
    """
    size = scores.shape[dim]
    if k >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(dim, order.narrow(dim, 0, k), True)


class PruningRule:
    """A pruning rule: a score per entry, and the axis along which the top entries are kept.

    Subclasses set ``name``, ``storable`` and ``axis`` (``-1``: keep the top
    ``keep_count(head_dim, s)`` channels of each token; ``-2``: keep the top
    ``keep_count(tokens, s)`` tokens of each channel) and implement :meth:`score`.
    """

    name: str = ""
    storable: bool = False
    axis: int = -1
    needs_queries: bool = False

    def score(self, x: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """Importance of each entry of ``x``; any shape that broadcasts to ``x``."""
        raise NotImplementedError

    def mask(self, x: torch.Tensor, sparsity: float, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep-mask, same shape as ``x`` ``[batch, kv_heads, tokens, head_dim]``.

        Raises:
            TypeError / ValueError: bad ``x``, ``sparsity`` or ``queries``.
        """
        check_tensor("x", x, ndim=4)
        check_head_dim("x", x.shape[-1])
        sparsity = check_sparsity("sparsity", sparsity)
        if self.needs_queries:
            _check_queries(queries, x)
        scores = self.score(x, queries)
        k = keep_count(x.shape[self.axis], sparsity)
        scores = scores.expand(*x.shape[:-2], scores.shape[-2], x.shape[-1]) if self.axis == -1 else scores
        return topk_mask(scores, k, dim=self.axis).expand_as(x)

    def prune(self, x: torch.Tensor, sparsity: float, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with the pruned entries set to zero (same shape and dtype)."""
        return torch.where(self.mask(x, sparsity, queries), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_queries(queries: torch.Tensor | None, x: torch.Tensor) -> None:
    if queries is None:
        raise ValueError("queries must be given for this rule: [batch, q_heads, q_len, head_dim], got None")
    check_tensor("queries", queries, ndim=4)
    if queries.shape[0] != x.shape[0] or queries.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"queries must be [batch={x.shape[0]}, q_heads, q_len, head_dim={x.shape[-1]}], got {tuple(queries.shape)}"
        )
    if queries.shape[2] < 1:
        raise ValueError(f"queries must hold at least one query token (q_len >= 1), got {tuple(queries.shape)}")
    if x.shape[1] == 0 or queries.shape[1] % x.shape[1] != 0:
        raise ValueError(f"queries' head count must be a multiple of kv_heads={x.shape[1]}, got {queries.shape[1]}")


def _group_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[batch, q_heads, q_len, d]`` -> ``[batch, kv_heads, group * q_len, d]`` in fp32."""
    b, hq, lq, d = queries.shape
    return queries.float().reshape(b, kv_heads, (hq // kv_heads) * lq, d)


class PerToken(PruningRule):
    """Per-token magnitude pruning (the Mustafar rule): score ``|x|``, top entries of each token."""

    name, storable, axis = "per-token", True, -1

    def score(self, x, queries):
        return x.abs()


class OutputAware(PruningRule):
    """Output-aware per-token pruning: score ``|k| * mean|q|`` over the recent queries of the GQA group.

    Still per token (storable). ``queries``: ``[batch, q_heads, q_len, head_dim]``,
    the recent queries (e.g. the last 32 of the prompt).
    """

    name, storable, axis, needs_queries = "output-aware", True, -1, True

    def score(self, x, queries):
        weight = _group_queries(queries, x.shape[1]).abs().mean(dim=2, keepdim=True)
        return x.float().abs() * weight


class PerChannel(PruningRule):
    """Per-channel magnitude pruning: for each channel keep the largest ``|x|`` over the tokens.

    Token counts differ per row, so this saves no memory in the bitmap format; it
    exists for accuracy studies only (simulation).
    """

    name, storable, axis = "per-channel", False, -2

    def score(self, x, queries):
        return x.abs()


class ThinK(PruningRule):
    """ThinK-style structured channel pruning (Xu et al. 2024, arXiv 2407.21018).

    Channel ``c`` of a KV head scores ``||Q[:, c]|| * ||X[:, c]||`` (the norm of
    the outer product), with ``Q`` the recent queries of the GQA group; the same
    channels are kept for every token. Saves no memory in the bitmap format
    (simulation only).
    """

    name, storable, axis, needs_queries = "think", False, -1, True

    def score(self, x, queries):
        q_norm = _group_queries(queries, x.shape[1]).norm(dim=2, keepdim=True)
        return x.float().norm(dim=2, keepdim=True) * q_norm


RULES: dict[str, PruningRule] = {rule.name: rule for rule in (PerToken(), OutputAware(), PerChannel(), ThinK())}


def get_rule(name: str) -> PruningRule:
    """The pruning rule registered as ``name`` (one of ``RULES``)."""
    if name not in RULES:
        raise ValueError(f"method must be one of {sorted(RULES)}, got {name!r}")
    return RULES[name]


def per_token_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of per-token magnitude pruning; ``x``: ``[batch, kv_heads, tokens, head_dim]``."""
    return RULES["per-token"].mask(x, sparsity)


def prune_per_token(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token magnitude pruning of ``x`` ``[batch, kv_heads, tokens, head_dim]`` (fp16/bf16/fp32).

    Keeps ``head_dim - floor(sparsity * head_dim)`` entries of largest ``|x|``
    per token and head (ties to the lower channel), zeroes the rest; returns a
    tensor of the same shape and dtype. Source: Mustafar, arXiv 2505.22913.

    Raises:
        TypeError: ``x`` not a floating tensor of a cache dtype.
        ValueError: wrong rank, head_dim over 256, sparsity outside [0, 1).
    """
    return RULES["per-token"].prune(x, sparsity)


def prune_output_aware(keys: torch.Tensor, sparsity: float, queries: torch.Tensor) -> torch.Tensor:
    """Output-aware per-token pruning of ``keys`` with the recent ``queries`` (see :class:`OutputAware`)."""
    return RULES["output-aware"].prune(keys, sparsity, queries)


def prune_per_channel(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-channel magnitude pruning along the token axis (simulation only, saves no memory)."""
    return RULES["per-channel"].prune(x, sparsity)


def prune_think(keys: torch.Tensor, sparsity: float, queries: torch.Tensor) -> torch.Tensor:
    """ThinK structured channel pruning of ``keys`` (simulation only, saves no memory)."""
    return RULES["think"].prune(keys, sparsity, queries)
