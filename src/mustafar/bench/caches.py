"""The caches of each benchmark mode, their KV bytes, and their per-step compression op.

Modes (one cache class per mode and setting):

- ``"generate"``: eager ``model.generate()``; dense = transformers' ``DynamicCache``
  (SDPA), sparse = :class:`mustafar.MustafarCache`.
- ``"graph"``: the graph-captured decode loop of :mod:`mustafar.bench.decode`;
  dense = transformers' ``StaticCache``, sparse = :class:`mustafar.StaticMustafarCache`
  (built only in :func:`static_sparse_cache`, the one place that knows it).

Example::

    >>> import mustafar
    >>> from mustafar.bench.caches import make_cache
    >>> from mustafar.bench.models import build_model
    >>> model = build_model("tiny", device="cpu")
    >>> make_cache("generate", mustafar.parse_setting("K0.5V0.5"), model, batch=1, max_tokens=64)
    MustafarCache(K0.5V0.5, window=32, chunk=256, layers=0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from ..cache import MustafarCache
from ..config import SparsityConfig
from ..format import num_words
from ..pruning import keep_count

__all__ = ["MODES", "make_cache", "static_sparse_cache", "kv_stats", "CompressOp", "compress_op"]

#: Decode modes of the benchmark.
MODES = ("generate", "graph")


def static_sparse_cache(model, setting: SparsityConfig, batch: int, max_tokens: int, backend: str = "auto"):
    """A :class:`mustafar.StaticMustafarCache` for ``setting`` (window from the setting; chunk does not apply).

    Raises:
        ImportError: this build of mustafar has no ``StaticMustafarCache``.
    """
    from ..cache import StaticMustafarCache

    return StaticMustafarCache(model.config, batch_size=batch, max_tokens=max_tokens,
                               key_sparsity=setting.key_sparsity, value_sparsity=setting.value_sparsity,
                               window=max(1, setting.window), dtype=model.dtype, device=model.device,
                               backend=backend)


def make_cache(mode: str, setting: SparsityConfig, model, batch: int, max_tokens: int, backend: str = "auto"):
    """A fresh cache for ``mode`` (see the module docstring) and ``setting``.

    ``max_tokens``: prompt + generated tokens the static caches preallocate for.

    Raises:
        ValueError: an unknown mode. TypeError: ``setting`` not a SparsityConfig.
        ImportError: ``"graph"`` with a sparse setting and no ``StaticMustafarCache``.
    """
    if not isinstance(setting, SparsityConfig):
        raise TypeError(f"setting must be a mustafar.SparsityConfig, got {type(setting).__name__}")
    if mode == "generate":
        return DynamicCache() if setting.is_dense else MustafarCache.from_config(setting, backend=backend)
    if mode == "graph":
        if setting.is_dense:
            return StaticCache(config=model.config, max_cache_len=max_tokens)
        return static_sparse_cache(model, setting, batch, max_tokens, backend)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def kv_stats(cache) -> dict:
    """KV bytes of ``cache``, all layers: ``kv_bytes``, ``kv_dense_bytes``, ``kv_allocated_bytes``.

    - Mustafar caches: ``kv_bytes`` = bytes of the tokens held (compressed store + dense window),
      ``kv_dense_bytes`` = the same tokens dense. A static one holds its whole allocation
      (``max_tokens``), and its token count on the host is not advanced by graph replays, so
      both are taken over ``max_tokens``: ``kv_bytes`` = allocated bytes.
    - transformers' caches: the bytes of the key and value tensors (for ``StaticCache``,
      the buffers of ``max_cache_len`` tokens), dense by definition.
    """
    if hasattr(cache, "max_tokens") and hasattr(cache, "allocated_nbytes"):
        allocated = cache.allocated_nbytes
        dense = sum(2 * cache.max_tokens * _tensor_bytes(layer.keys[:, :, 0]) for layer in cache.layers)
        return {"kv_bytes": allocated, "kv_dense_bytes": dense, "kv_allocated_bytes": allocated}
    if hasattr(cache, "nbytes") and hasattr(cache, "dense_nbytes"):
        return {"kv_bytes": cache.nbytes, "kv_dense_bytes": cache.dense_nbytes,
                "kv_allocated_bytes": getattr(cache, "allocated_nbytes", cache.nbytes)}
    held = sum(_tensor_bytes(t) for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values))
    return {"kv_bytes": held, "kv_dense_bytes": held, "kv_allocated_bytes": held}


@dataclass(frozen=True)
class CompressOp:
    """The compression work of one decode step in one layer.

    ``run()`` performs one compression call (K and V) on tensors of the cache's
    shape and dtype, without changing what the cache holds; ``per_step`` calls
    happen per decode step on average (``1 / chunk`` for ``MustafarCache``,
    which compresses ``chunk`` tokens at once every ``chunk`` steps).
    """

    run: Callable[[], None]
    per_step: float
    tokens_per_call: int


def compress_op(cache, setting: SparsityConfig, batch: int, model) -> CompressOp | None:
    """The per-step compression op of ``cache`` (``None`` for dense caches)."""
    if setting.is_dense:
        return None
    layer = cache.layers[0]
    if hasattr(layer, "length") and hasattr(layer, "max_tokens"):  # StaticMustafarLayer: one token per step
        from ..cache import static_evict

        if int(layer.length) >= layer.max_tokens:  # the timed eviction writes the next step's store row
            raise ValueError(f"cache must have room for one more token to time its eviction: it holds "
                             f"{int(layer.length)} of max_tokens={layer.max_tokens}")

        def evict():  # idempotent: rewrites the row the next step writes, from the same ring slot
            static_evict(layer.keys, layer.key_store, layer.length, layer.backend)
            static_evict(layer.values, layer.value_store, layer.length, layer.backend)

        return CompressOp(evict, per_step=1.0, tokens_per_call=1)
    return _chunk_compress_op(setting, batch, model, getattr(layer, "backend", "auto"))


def _chunk_compress_op(setting: SparsityConfig, batch: int, model, backend: str) -> CompressOp:
    """``MustafarCache``: prune and compress ``chunk`` random K and V rows into scratch buffers."""
    from ..ops import compress_into
    from .models import model_dims

    dims = model_dims(model.config)
    shape = (batch, dims["kv_heads"], setting.chunk, dims["head_dim"])
    rows = torch.randn(shape, dtype=model.dtype, device=model.device)
    outputs = []
    for sparsity in (setting.key_sparsity, setting.value_sparsity):
        values = torch.empty(*shape[:3], keep_count(shape[3], sparsity), dtype=model.dtype, device=model.device)
        bitmaps = torch.empty(*shape[:3], num_words(shape[3]), dtype=torch.int64, device=model.device)
        outputs.append((sparsity, values, bitmaps))

    def run():
        for sparsity, values, bitmaps in outputs:
            compress_into(rows, sparsity, values, bitmaps, 0, backend)

    return CompressOp(run, per_step=1.0 / setting.chunk, tokens_per_call=setting.chunk)
