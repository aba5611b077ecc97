"""Predicted device memory of a benchmark case, checked before running it (bytes).

A case that is predicted not to fit is skipped with the reason, instead of
thrashing the allocator into an out-of-memory error halfway through a long
prefill. The model (weights excluded: they are already resident):

- **KV cache** when full (prompt + generated tokens): dense, ``2 * layers *
  batch * kv_heads * tokens * head_dim * itemsize``; sparse, per token and head
  :func:`mustafar.format.bytes_per_token` for K and V (the store rounded up to
  whole capacity granules) plus a dense local window (``window + chunk`` tokens
  at most, or the ring of a static cache).
- **Prefill activations**, the largest of the MLP (``2 * hidden + 3 *
  intermediate`` values per token: input, residual, and three ``intermediate``
  tensors alive at the gated product), the attention block (``3 * hidden + 3 *
  (q_heads + 2 * kv_heads) * head_dim``: q, k, v, their RoPE'd copies and the
  output) and the fp32 RMSNorm temporaries (``3 * hidden`` fp32), times
  ``batch * prompt`` tokens.
- **Transients of one layer**: the dense K and V of the prompt that a cache
  copies during prefill (twice: the states and the copy), and, for a dense
  static cache, K and V repeated to every query head for SDPA with a mask
  (``repeat_kv``: transformers does it whenever the decode mask is materialised).

It is an estimate (a few per cent); a case predicted to fit that runs out of
memory anyway is recorded as skipped with the error.
"""

from __future__ import annotations

import torch

from ..config import SparsityConfig
from ..format import CAPACITY_GRANULE, bytes_per_token, dense_bytes_per_token

__all__ = ["predict_bytes", "gib"]

_FP32_BYTES = 4
_GIB = 2**30


def gib(nbytes: float | None) -> str:
    """``nbytes`` as ``'12.3 GiB'`` (below 0.1 GiB: ``'45.6 MiB'``; ``'-'`` for ``None``)."""
    if nbytes is None:
        return "-"
    return f"{nbytes / _GIB:.1f} GiB" if nbytes >= _GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _kv_bytes(dims: dict, setting: SparsityConfig, mode: str, batch: int, tokens: int, dtype: torch.dtype) -> int:
    heads_layers = dims["layers"] * batch * dims["kv_heads"]
    dense_token = dense_bytes_per_token(dims["head_dim"], dtype)
    if setting.is_dense:
        return 2 * heads_layers * tokens * dense_token
    window = max(1, setting.window) if mode == "graph" else setting.window + setting.chunk
    window = min(window, tokens)
    sparsities = (setting.key_sparsity, setting.value_sparsity)
    sparse_token = sum(bytes_per_token(dims["head_dim"], s, dtype, setting.kept_dtype) for s in sparsities)
    stored = -(-(tokens - window) // CAPACITY_GRANULE) * CAPACITY_GRANULE  # stores grow in whole granules
    return heads_layers * (stored * sparse_token + 2 * window * dense_token)


def _activation_bytes_per_token(dims: dict, itemsize: int) -> int:
    hidden, inter = dims["hidden"], dims["intermediate"]
    qkv = (dims["q_heads"] + 2 * dims["kv_heads"]) * dims["head_dim"]
    mlp = (2 * hidden + 3 * inter) * itemsize
    attention = (3 * hidden + 3 * qkv) * itemsize
    norm = 2 * hidden * itemsize + 3 * hidden * _FP32_BYTES
    return max(mlp, attention, norm)


def predict_bytes(dims: dict, setting: SparsityConfig, mode: str, batch: int, prompt: int, new_tokens: int,
                  dtype: torch.dtype = torch.float16, prefill_batch: int | None = None) -> dict:
    """Predicted peak bytes of a case beyond the weights: ``{"kv", "prefill", "decode", "total"}``.

    ``total = kv + max(prefill, decode)``: the full cache, plus the larger of the
    prefill's activations and transients and the decode step's transients.

    Args:
        dims: :func:`mustafar.bench.models.model_dims` of the model.
        setting: the sparsity setting; mode: ``"generate"`` or ``"graph"``.
        batch, prompt, new_tokens: the case (tokens).
        dtype: the model's dtype.
        prefill_batch: sequences prefilled at once (None: ``batch``); the capacity search's
            one-sequence prefill passes 1.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = prompt + new_tokens
    kv = _kv_bytes(dims, setting, mode, batch, tokens, dtype)
    rows = batch if prefill_batch is None else min(prefill_batch, batch)
    layer_kv = 2 * batch * dims["kv_heads"] * tokens * dims["head_dim"] * itemsize
    logits = 2 * batch * dims["vocab"] * _FP32_BYTES
    prefill = rows * prompt * _activation_bytes_per_token(dims, itemsize) + 2 * layer_kv * rows // batch + logits
    decode = logits
    if setting.is_dense and mode == "graph":
        decode += layer_kv * (dims["q_heads"] // dims["kv_heads"])
    return {"kv": kv, "prefill": prefill, "decode": decode, "total": kv + max(prefill, decode)}
