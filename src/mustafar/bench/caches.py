"""The per-step compression op of each benchmark cache (what the step breakdown times).

The caches themselves come from :func:`mustafar.generation.make_cache` (one per decode mode and setting)
and their KV bytes from :func:`mustafar.generation.kv_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache import StaticMustafarCache, static_evict
from ..config import SparsityConfig
from ..format import BitmapKV

__all__ = ["CompressOp", "compress_op"]


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
    if isinstance(cache, StaticMustafarCache):  # one token per step
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
        store = BitmapKV.empty(*shape[:2], shape[3], sparsity, model.dtype, model.device, capacity=shape[2],
                               kept_dtype=setting.kept_dtype)
        outputs.append((sparsity, *store.storage, store.scale_storage))

    def run():
        for sparsity, values, bitmaps, scales in outputs:
            compress_into(rows, sparsity, values, bitmaps, 0, backend, scales=scales)

    return CompressOp(run, per_step=1.0 / setting.chunk, tokens_per_call=setting.chunk)
