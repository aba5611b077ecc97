"""Perplexity through the (compressed) KV cache.

A window of ``L`` tokens of real text is split into a prefix of ``L - S`` tokens,
prefilled densely (as Mustafar, arXiv 2505.22913, does), and a continuation of
``S`` tokens scored through decode steps that read the cache: the first
continuation token from the prefill's last logits, the others from forwards of
``chunk`` tokens at a time after everything before them is in the cache. With a
``MustafarCache`` those steps attend over the pruned, compressed store plus the
dense local window. Each query of a forward sees the cache as token-by-token
decoding would (issue 17), so ``chunk`` changes the speed (the CPU reference
decompresses the store once per forward, and once more where a forward straddles a
chunk boundary of the cache) and the floating-point rounding, not what is attended;
``chunk=1`` runs one token per forward.

Perplexity = ``exp(mean NLL)`` over the ``S`` continuation tokens (natural log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..generation import forward

__all__ = ["PerplexityResult", "score_continuation", "dense_perplexity", "text_windows"]


@dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood (nats) over ``tokens`` scored tokens."""

    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        """``exp(nll / tokens)``."""
        return math.exp(self.nll / self.tokens)


def _check_ids(name: str, ids: object, minimum: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.dtype != torch.long:
        raise ValueError(f"{name} must be an int64 tensor [1, n], got {getattr(ids, 'shape', type(ids).__name__)}")
    if ids.shape[1] < minimum:
        raise ValueError(f"{name} must hold at least {minimum} tokens, got {ids.shape[1]}")
    return ids


def score_continuation(model, cache, first_logits: torch.Tensor, continuation: torch.Tensor,
                       chunk: int = 1) -> PerplexityResult:
    """NLL of ``continuation [1, S]`` (int64) after the tokens in ``cache``.

    Args:
        cache: holds the prefix; ``first_logits [1, vocab]`` are the prefix's next-token logits.
        chunk: continuation tokens per forward, >= 1.
    """
    _check_ids("continuation", continuation, 1)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    targets = continuation[0]
    logits = [first_logits.float().reshape(1, -1)]
    for start in range(0, targets.numel() - 1, chunk):
        piece = continuation[:, start : min(start + chunk, targets.numel() - 1)]
        logits.append(forward(model, piece, cache)[0])
    all_logits = torch.cat(logits).to(targets.device)
    nll = torch.nn.functional.cross_entropy(all_logits.double(), targets, reduction="sum")
    return PerplexityResult(float(nll), targets.numel())


@torch.inference_mode()
def dense_perplexity(model, input_ids: torch.Tensor, prefix_len: int) -> PerplexityResult:
    """NLL of ``input_ids[:, prefix_len:]`` from one dense forward over all of ``input_ids [1, n]`` (no cache)."""
    _check_ids("input_ids", input_ids, 2)
    if not 1 <= prefix_len < input_ids.shape[1]:
        raise ValueError(f"prefix_len must be in [1, {input_ids.shape[1] - 1}], got {prefix_len}")
    logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits[0].double()
    targets = input_ids[0, prefix_len:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits[prefix_len - 1 : -1], targets, reduction="sum")
    return PerplexityResult(float(nll), targets.numel())


def text_windows(token_ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` consecutive, non-overlapping windows ``[1, length]`` from the start of ``token_ids [n]``.

    Raises:
        ValueError: the text holds fewer than ``length`` tokens.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-d, got shape {tuple(token_ids.shape)}")
    available = token_ids.numel() // length
    if available < 1:
        raise ValueError(f"the text must hold at least {length} tokens for a context length of {length}, "
                         f"got {token_ids.numel()}: pass a longer text file or a shorter context length")
    return [token_ids[i * length : (i + 1) * length].unsqueeze(0) for i in range(min(count, available))]
