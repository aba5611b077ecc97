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
  copies during prefill (twice: the states and the copy), and for a chunked
  prefill of the eager caches transformers' bool mask (``batch * chunk *
  prompt`` bytes). A chunked prefill of the static (graph-mode) caches builds no
  mask and copies nothing beyond the chunk's states, plus, for the sparse one,
  the decompressed history of a few rows at a time (``CHUNK_GROUP_BYTES``).
  Prefill activations then count ``batch * chunk`` tokens.

It is an estimate (a few per cent); a case predicted to fit that runs out of
memory anyway is recorded as skipped with the error.
"""

from __future__ import annotations

import torch

from ..cache.static import CHUNK_GROUP_BYTES
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
                  dtype: torch.dtype = torch.float16, prefill_batch: int | None = None,
                  chunk: int | None = None, random_fill: bool = False) -> dict:
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
        chunk: prefill chunk in tokens (None: the whole prompt at once).
        random_fill: the cache is filled with random K and V (``mustafar bench --random-fill``), no forward
            pass: the "prefill" term is then the fill's transients (each chunk's random K and V and the
            update's copies; a ``DynamicCache`` concatenates the layer), not the model's activations.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = prompt + new_tokens
    kv = _kv_bytes(dims, setting, mode, batch, tokens, dtype)
    rows = batch if prefill_batch is None else min(prefill_batch, batch)
    layer_kv = 2 * batch * dims["kv_heads"] * tokens * dims["head_dim"] * itemsize
    logits = 2 * batch * dims["vocab"] * _FP32_BYTES
    step = prompt if chunk is None else min(chunk, prompt)
    if random_fill:
        chunk_states = 2 * batch * dims["kv_heads"] * step * dims["head_dim"] * itemsize  # random K and V
        prefill = 2 * chunk_states + (0 if mode == "graph" else 2 * layer_kv)
        return {"kv": kv, "prefill": prefill, "decode": logits, "total": kv + max(prefill, logits)}
    prefill = rows * step * _activation_bytes_per_token(dims, itemsize) + logits
    if step < prompt and mode == "graph":  # static caches: the chunk's states, the sparse history in row groups
        prefill += 4 * rows * dims["kv_heads"] * step * dims["head_dim"] * itemsize
        prefill += 0 if setting.is_dense else min(CHUNK_GROUP_BYTES, layer_kv)
    else:  # the layer's K and V copied (states and copy); chunks: transformers' bool mask over every token held
        prefill += 2 * layer_kv * rows // batch + (rows * step * prompt if step < prompt else 0)
    decode = logits
    return {"kv": kv, "prefill": prefill, "decode": decode, "total": kv + max(prefill, decode)}
