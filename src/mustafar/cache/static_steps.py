"""The decode-step bookkeeping and the chunked prefill of :class:`~mustafar.cache.static.StaticMustafarLayer`.

A mixin of that layer (it reads the layer's ring ``keys`` / ``values``, stores, ``length``,
``counter``, ``window``, ``backend``, ``host_length``), kept apart so that the layer module stays
about its storage and its transformers API (issue 14):

- **Bookkeeping** of a decode step: evict the oldest window token into the store (pruned and
  compressed), write the new token into the ring, advance ``length``; one Triton launch per layer
  where :attr:`StaticSteps.fused` (:mod:`mustafar.kernels.bookkeeping`), else the unfused ops,
  with bit-identical stores.
- **Chunked prefill**: a multi-token step on a partly filled cache, attending to every token held
  before it as decoding would read them (the store's pruned, the window's dense).

Source of the method: Mustafar, arXiv 2505.22913.
"""

from __future__ import annotations

import os

import torch

from ..chunk_attention import chunk_attention
from ..format import BitmapKV, expand_store
from ..fp8 import is_fp8
from ..ops import append
from .static_ops import static_evict

__all__ = ["StaticSteps", "CHUNK_GROUP_BYTES", "FUSED_ENV", "FUSED_FP8_ENV"]

#: Bytes of dense K and V history a chunked prefill's attention builds at a time (a few batch rows at once).
CHUNK_GROUP_BYTES = 512 * 2**20
#: Environment variable: ``0`` turns the fused Triton bookkeeping (and the Triton decompression of chunked
#: prefills) off, for the unfused ops (a fallback; both give the same bits).
FUSED_ENV = "MUSTAFAR_FUSED_BOOKKEEPING"
#: Environment variable: ``0`` keeps FP8 stores on CUDA devices on the unfused ops and the PyTorch
#: decompression of chunked prefills (:func:`_expand_into`) while cache-dtype stores stay fused. The fused FP8
#: forms are bit-exact against those ops on an H200 (``tests/test_fused_bookkeeping.py``, 2026-12-03, fifth
#: session) and under the Triton interpreter; the switch is for bisecting, like :data:`FUSED_ENV`.
FUSED_FP8_ENV = "MUSTAFAR_FUSED_FP8"


class StaticSteps:
    """Decode-step bookkeeping and prefill chunks of a static compressed layer (a mixin; see the module)."""

    @property
    def fused(self) -> bool:
        """Whether a decode step's bookkeeping is the one fused Triton launch (CUDA or the Triton interpreter).

        Kept values in the cache dtype or FP8 (e4m3 bits and per-token scales, written as the unfused
        ops write them) alike, unless ``MUSTAFAR_FUSED_BOOKKEEPING=0`` (:data:`FUSED_ENV`), or for FP8 stores on
        a CUDA device ``MUSTAFAR_FUSED_FP8=0`` (:data:`FUSED_FP8_ENV`). It also picks the Triton decompression of
        a chunked prefill's store.
        """
        from ..backends import triton_available
        from ..launch.bookkeeping import fused_supported

        if not self.is_initialized:  # no device, no buffers yet (the first update allocates them)
            return False
        asked = self.backend == "triton" or (self.backend != "torch" and self.device.type == "cuda")
        allowed = os.environ.get(FUSED_ENV, "1") != "0"
        if is_fp8(self.kept_dtype) and self.device.type == "cuda":
            allowed = allowed and os.environ.get(FUSED_FP8_ENV, "1") != "0"
        return asked and allowed and triton_available() and fused_supported(self.keys)

    def _bookkeeping(self, key_states: torch.Tensor, value_states: torch.Tensor, advance: bool = True,
                     state: tuple | None = None) -> None:
        """Evict the oldest ring token into the store, write the new one, advance ``length`` (on the device).

        One fused Triton launch where :attr:`fused`, else the unfused ops (the reference of the fused
        kernel: bit-identical stores). ``state``: ``(keys, values, key_store, value_store, length,
        counter)`` to work on instead of the layer's own (the benchmark's timer uses scratch copies).
        """
        keys, values, key_store, value_store, length, counter = state or (
            self.keys, self.values, self.key_store, self.value_store, self.length, self.counter)
        if self.fused:
            from ..launch.bookkeeping import fused_bookkeeping

            fused_bookkeeping(key_states, value_states, keys, values, key_store, value_store, length, counter,
                              advance)
            return
        static_evict(keys, key_store, length, self.backend)
        static_evict(values, value_store, length, self.backend)
        slot = (length % self.window).view(1)
        keys.index_copy_(2, slot, key_states)
        values.index_copy_(2, slot, value_states)
        if advance:
            length += 1

    def bookkeeping_probe(self):
        """A call doing one decode step's bookkeeping of this layer on scratch buffers of its shapes.

        The scratch ring and one-granule stores hold copies of this layer's ring; ``length`` is set so
        that every call compresses a token (the store row 0), so the work equals a real step's.
        """
        from ..format import CAPACITY_GRANULE

        b, h, w, d = self.keys.shape
        stores = [BitmapKV.empty(b, h, d, store.sparsity, self.dtype, self.device, capacity=CAPACITY_GRANULE,
                                 kept_dtype=self.kept_dtype)
                  for store in (self.key_store, self.value_store)]
        length = torch.full((), w, dtype=torch.int64, device=self.device)
        state = (self.keys.clone(), self.values.clone(), *stores, length, torch.zeros_like(self.counter))
        new_k, new_v = self.keys[:, :, :1].clone(), self.values[:, :, :1].clone()
        return lambda: self._bookkeeping(new_k, new_v, advance=False, state=state)

    def _chunk(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A prefill chunk on a partly filled cache: store it, keep what its attention needs, return its states.

        The attention (:meth:`attend`) reads every token held before the chunk as the chunk's
        queries see it: the store's tokens pruned, the window's (the ring before this chunk) dense,
        then the chunk's own. The tokens that leave the window are pruned and compressed into the
        store; the ring keeps the last ``window``.
        """
        held, n, w = self.host_length, key_states.shape[2], self.window
        stored, new_stored = max(0, held - w), max(0, held + n - w)
        ring_slots = torch.arange(stored, held, device=self.device) % w
        windows = []
        for ring, store, new in ((self.keys, self.key_store, key_states), (self.values, self.value_store,
                                                                           value_states)):
            window = ring.index_select(2, ring_slots)  # tokens stored .. held-1, in order, before this chunk
            if new_stored > stored:
                append(store, torch.cat([window, new], dim=2)[:, :, :new_stored - stored])
            first = max(new_stored, held)  # the ring's slots of tokens first .. held+n-1 take the new tokens
            slots = torch.arange(first, held + n, device=self.device) % w
            ring.index_copy_(2, slots, new[:, :, first - held:])
            windows.append(window)
        self._chunk_history = (stored, *windows)
        self.length.fill_(held + n)
        self.host_length = held + n
        return self._linked(key_states, value_states, dense=False)

    def _chunk_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """A chunk's attention over the tokens held before it (see :meth:`_chunk`) and its own.

        The dense K and V of the history are built for a few batch rows at a time (at most
        :data:`CHUNK_GROUP_BYTES`), so the transient memory does not grow with the batch.
        """
        stored, key_window, value_window = self._chunk_history
        batch, kv_heads, n, head_dim = key.shape
        tokens = stored + key_window.shape[2] + n
        row_bytes = 2 * kv_heads * tokens * head_dim * key.element_size()
        group = max(1, min(batch, CHUNK_GROUP_BYTES // row_bytes))
        out = torch.empty_like(query)
        for first in range(0, batch, group):
            rows = slice(first, first + group)
            keys = self._history(self.key_store, stored, key_window[rows], key[rows], rows)
            values = self._history(self.value_store, stored, value_window[rows], value[rows], rows)
            out[rows] = chunk_attention(query[rows], keys, values, scale)
        return out

    def _history(self, store: BitmapKV, stored: int, window: torch.Tensor, new: torch.Tensor,
                 rows: slice) -> torch.Tensor:
        """Dense ``[rows, kv_heads, stored + window + n, head_dim]``: store rows decompressed, window, new."""
        values, bitmaps = store.storage
        scales = None if store.scale_storage is None else store.scale_storage[rows, :, :stored]
        held = stored + window.shape[2]
        out = torch.empty(*new.shape[:2], held + new.shape[2], new.shape[3], dtype=new.dtype, device=new.device)
        _expand_into(values[rows, :, :stored], bitmaps[rows, :, :stored], out[:, :, :stored], self.fused, scales)
        out[:, :, stored:held] = window
        out[:, :, held:] = new
        return out


def _expand_into(values: torch.Tensor, bitmaps: torch.Tensor, out: torch.Tensor, triton: bool,
                 scales: torch.Tensor | None = None) -> None:
    """Decompress store rows into ``out``: the Triton kernel where ``triton`` (the layer's :attr:`StaticSteps.fused`),
    else :func:`mustafar.format.expand_store`; bit-identical.

    FP8 kept values (``float8_e4m3fn``, with their ``scales [rows, h, stored]`` in ``out``'s dtype) take the
    Triton kernel too, unless ``MUSTAFAR_FUSED_FP8=0`` (:data:`FUSED_FP8_ENV`) on a CUDA device, when this
    decompression runs the reference.
    """
    if out.shape[2] == 0:
        return
    if triton:
        from ..launch.expand import expand_triton

        expand_triton(values, bitmaps, out, scales)
        return
    out.copy_(expand_store(values, bitmaps, out.shape[3], scales))
