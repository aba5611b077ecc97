"""``MustafarLayer``: one layer of :class:`~mustafar.MustafarCache`, a compressed store and a dense local window.

Source: Mustafar (Joo et al., arXiv 2505.22913). The layer holds, in token order,
a **compressed store** (two :class:`~mustafar.format.BitmapKV`, K and V: the
oldest tokens, pruned once when they enter it) and the **local window** (dense
``keys`` / ``values``, ``[batch, kv_heads, w, head_dim]``).

What the attention reads follows :mod:`mustafar.cache.rules`: the first update
of an empty layer, of any length (the **prefill**), is attended dense, as in
the paper; every later update attends each row's tokens before its boundary
pruned (per token) and the rest dense. Where the tokens physically are does not
change that:

- **eviction**: after an update (after the prefill's attention, which also reads
  the left padding from the mask), the window's oldest tokens move to the store
  up to the smallest row boundary. Without padding that is whole chunks: the
  window keeps ``window`` to ``window + chunk - 1`` tokens.
- **past recording** (``record_past``, set by transformers' ``activate_past_recording``
  before assisted decoding): an update moves only tokens held before it, so that
  ``crop`` of up to that update's tokens is exact. The window then also holds
  the last update's tokens; the attention prunes what lags behind.
- **crop** removes tokens only where the result is a state the rule allows (no
  token pruned that the rule keeps dense); otherwise ``ValueError``, since pruned
  entries cannot be restored.
- **chunked prefill of a padded batch**: a row whose tokens so far are all padding
  (its first chunks hold only padding) keeps counting the leading padding of the
  next updates (read from their masks), and its first update with real tokens
  (one or more) is attended dense, like that prompt's prefill alone; the
  eviction waits for the next update. Only such updates read the mask on the host.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .._checks import check_positive_int, check_sparsity
from ..attention import Link, held_mask, link_tensor
from ..format import BitmapKV
from ..fp8 import check_kept_dtype, is_fp8
from ..model_support import check_attention_implementation, check_reader
from ..ops import BACKENDS, append, decode_attention_unchecked
from .rows import BatchRowEdits
from .rules import boundaries, crop_limit, pads_from_mask, prune_rows_prefix, query_blocks

__all__ = ["NO_OFFLOADING", "MustafarLayer"]

#: Message of the ``NotImplementedError`` raised for offloading.
NO_OFFLOADING = ("MustafarCache does not support offloading (Cache(offloading=True)); its compressed store already "
                 "holds a fraction of the dense bytes")


class MustafarLayer(BatchRowEdits, CacheLayerMixin):
    """One layer of :class:`MustafarCache`: a compressed store and a dense local window.

    Attributes:
        keys, values: the local window, ``[batch, kv_heads, w, head_dim]``, the cache dtype.
        key_store, value_store: :class:`BitmapKV` of the older tokens (``None`` before the first update).
        key_sparsity, value_sparsity: fraction of each Key / Value vector zeroed in the store, in [0, 1).
        pads: left-padding tokens per batch row (read from the prefill's attention mask, and from later
            updates' masks while a row holds only padding).
        record_past: keep the last update's tokens dense so that ``crop`` can remove them exactly.
        window, chunk, backend, kept_dtype: see :class:`MustafarCache`; layer_idx: the model layer (for messages).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, key_sparsity: float, value_sparsity: float, window: int, chunk: int, backend: str = "auto",
                 layer_idx: int = 0, record_past: bool = False, kept_dtype: torch.dtype | None = None):
        super().__init__()
        self.key_sparsity = check_sparsity("key_sparsity", key_sparsity)
        self.value_sparsity = check_sparsity("value_sparsity", value_sparsity)
        self.window = check_positive_int("window", window, minimum=0)
        self.chunk = check_positive_int("chunk", chunk)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.layer_idx, self.record_past = backend, layer_idx, bool(record_past)
        self.kept_dtype = check_kept_dtype(kept_dtype)
        self.key_store: BitmapKV | None = None
        self.value_store: BitmapKV | None = None
        self.pads: list[int] = []
        self._unconsumed = self._pending = False
        self._padding_from: int | None = None  # set by an update after which a row may still be all padding
        self._reader: int | None = None
        self._reader_config = None  # config of the reader module: which attention reads the next update
        self._before_eviction: tuple | None = None  # (stored, keys, values) before a multi-token step's eviction

    def __repr__(self) -> str:
        return (
            f"MustafarLayer({self.layer_idx}, K{self.key_sparsity:g}V{self.value_sparsity:g}, window={self.window}"
            f", chunk={self.chunk}, stored={self.stored_tokens}, tokens={self.get_seq_length()})"
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the empty window and stores on the device and in the dtype of the states."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        b, h, _, d = key_states.shape
        kept = self.kept_dtype
        self.key_store = BitmapKV.empty(b, h, d, self.key_sparsity, dtype=key_states.dtype, device=self.device,
                                        kept_dtype=kept)
        self.value_store = BitmapKV.empty(b, h, d, self.value_sparsity, dtype=value_states.dtype, device=self.device,
                                          kept_dtype=kept)
        self.pads = [0] * b
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``key_states``/``value_states`` ``[batch, kv_heads, n, head_dim]``; return dense K, V.

        Returns every token held, unpruned, for the prefill (the first update of an empty layer, of any
        length ``n >= 1``: issue 17) or while no token is to be pruned: the attention runs dense SDPA on
        them. Otherwise returns the local window, new tokens included, and the attention reads the store
        besides.

        Raises:
            ValueError: the model that read this layer now runs another attention implementation than
                ``"mustafar"`` (refused before any change: see
                :func:`mustafar.model_support.check_attention_implementation`); the previous output was not
                read by the ``"mustafar"`` attention; ``value_states`` unlike ``key_states`` (shape, dtype,
                device); states unlike the cached tokens (batch, kv_heads, head_dim, dtype, device); an empty batch.
        """
        check_attention_implementation(self.layer_idx, self._reader_config)
        if self._unconsumed:
            missed = ("so the prefill is still held dense and unpruned (the cache prunes it once that attention has "
                      "read its attention mask)" if self._pending else
                      "so that step's attention missed the compressed tokens (its outputs were wrong)")
            raise ValueError(
                f"MustafarCache layer {self.layer_idx}: the keys returned by the previous update were not read by the "
                f"'mustafar' attention implementation, {missed}. Call cache.reset() (or use a new cache), load the "
                'model with attn_implementation="mustafar" (or call model.set_attn_implementation("mustafar")) after '
                "`import mustafar`, and run the prompt again. Models that transform the cached states before "
                "attention (e.g. DeepSeek's multi-head latent attention) cannot use a MustafarCache"
            )
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old, n = self.get_seq_length(), key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._pending = old == 0  # the prefill (any length): evicted after its attention has read the padding
        # a row holding only padding so far (pads never exceed the tokens held): its pads may go on in this update
        self._padding_from = old if old and max(self.pads) == old else None
        self._before_eviction = None
        if not self._pending and self._padding_from is None:
            before = (self.stored_tokens, self.keys, self.values)
            self._evict(old if self.record_past else old + n)
            if n > 1 and self.stored_tokens > before[0]:  # its first queries may need the moved tokens dense
                self._before_eviction = before
        dense = self._pending or (self.stored_tokens == 0 and self._nothing_pruned(old + n))
        link_tensor(self.keys, Link(self, dense))
        self._unconsumed = True
        return self.keys, self.values

    def _nothing_pruned(self, total: int) -> bool:
        return all(b == p for b, p in zip(boundaries(total, self.pads, self.window, self.chunk), self.pads))

    def _evict(self, total: int) -> None:
        """Move the window's oldest tokens to the store, up to the smallest row boundary at ``total`` tokens."""
        moved = min(boundaries(total, self.pads, self.window, self.chunk)) - self.stored_tokens
        if moved <= 0:
            return
        append(self.key_store, self.keys[:, :, :moved])
        append(self.value_store, self.values[:, :, :moved])
        self.keys, self.values = self.keys[:, :, moved:].clone(), self.values[:, :, moved:].clone()

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Python-level checks only (shapes, dtypes, devices): no host synchronisation on the decode path."""
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(new, torch.Tensor) or new.dim() != 4:
                raise ValueError(
                    f"{name} must be a 4-d tensor [batch, kv_heads, n, head_dim], got {type(new).__name__}"
                    f" {tuple(getattr(new, 'shape', ()))}"
                )
        if value_states.shape[-1] != key_states.shape[-1]:
            raise ValueError(
                f"value_states must have the head_dim of key_states ({key_states.shape[-1]}) in a MustafarCache, got "
                f"{value_states.shape[-1]} (models that cache latents of other sizes, e.g. DeepSeek V2/V3 multi-head "
                "latent attention, are not supported)"
            )
        if value_states.shape != key_states.shape or value_states.dtype != key_states.dtype \
                or value_states.device != key_states.device:
            raise ValueError(
                f"value_states must match key_states [batch, kv_heads, n, head_dim] {tuple(key_states.shape)} "
                f"{key_states.dtype} on {key_states.device}, got {tuple(value_states.shape)} {value_states.dtype} "
                f"on {value_states.device}"
            )
        if key_states.shape[0] == 0:
            raise ValueError(f"key_states must hold at least one batch row, got {tuple(key_states.shape)}")
        if not self.is_initialized:
            return
        old = self.keys
        if key_states.shape[:2] != old.shape[:2] or key_states.shape[3] != old.shape[3] \
                or key_states.dtype != old.dtype:
            raise ValueError(
                f"key_states must be [{old.shape[0]}, {old.shape[1]}, n, {old.shape[3]}] {old.dtype} like the cached "
                f"tokens (call cache.reset() for a new batch), got {tuple(key_states.shape)} {key_states.dtype}"
            )
        if key_states.device != self.device:
            raise ValueError(
                f"key_states and value_states must be on the device of MustafarCache layer {self.layer_idx}, "
                f"{self.device}, got {key_states.device} (move them, or call cache.reset() to start over there)"
            )

    def consume(self, module=None, attention_mask: torch.Tensor | None = None) -> None:
        """Mark the output of the last :meth:`update` as read by the ``"mustafar"`` attention.

        ``module``: the attention module (checked: causal, and the layer's first reader);
        ``attention_mask``: its mask, from which a prefill learns each row's left padding.

        Raises:
            ValueError: see :func:`mustafar.model_support.check_reader` and
                :func:`mustafar.cache.rules.pads_from_mask`.
        """
        if module is not None:
            self._reader = check_reader(self.layer_idx, module, self._reader)
            self._reader_config = getattr(module, "config", None)
        if self._pending:
            self.pads = pads_from_mask(attention_mask, self.keys.shape[0], self.keys.shape[2])
            self._pending = False
            self._evict(0 if self.record_past else self.get_seq_length())
        elif self._padding_from is not None and attention_mask is not None:
            old, n = self._padding_from, self.get_seq_length() - self._padding_from
            more = pads_from_mask(attention_mask[..., old:], len(self.pads), n)
            self.pads = [p + m if p == old else p for p, m in zip(self.pads, more)]
        self._unconsumed = False

    def attend(self, query, key, value, scale, attention_mask) -> torch.Tensor:
        """Decode attention of ``query [b, q_heads, q_len, d]`` over the store and the window ``key``/``value``.

        Each query sees the cache as token-by-token decoding would have shown it (issue 17): the tokens
        before its own row boundaries pruned, the later ones dense. Window tokens before a boundary are
        pruned on the fly; a step whose queries lie on both sides of a boundary runs one attention per
        run of queries (:func:`~mustafar.cache.rules.query_blocks`), each over the tokens up to its last
        query, with the tokens this step moved to the store still dense. ``attention_mask`` covers every
        token held (longer masks are cut). Returns ``[b, q_heads, q_len, d]``.
        """
        total, n = self.get_seq_length(), query.shape[2]
        mask = held_mask(attention_mask, total)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        # a row that held only padding before this update: its first real tokens (one or more) are its prefill
        first = self._padding_from
        dense_rows = [False] * len(self.pads) if first is None else [p >= first for p in self.pads]
        blocks = [(0, 1)] if n == 1 else query_blocks(
            total - n, n, sorted({p for p, d in zip(self.pads, dense_rows) if not d}) or [0], self.window, self.chunk)
        stores, stored = (self.key_store, self.value_store), self.stored_tokens
        fp8 = is_fp8(self.kept_dtype)  # window tokens pruned on the fly read what the FP8 store would hold
        if len(blocks) > 1 and self._before_eviction is not None:  # the store as it was before this step
            stored, key, value = self._before_eviction
            stores = tuple(store.first_tokens(stored) for store in stores)
        self._before_eviction = None
        outputs = []
        for start, stop in blocks:
            end = total - n + stop  # tokens up to the block's last query
            lags = [0 if d else max(0, b - stored)
                    for b, d in zip(boundaries(end, self.pads, self.window, self.chunk), dense_rows)]
            held = end - stored  # window tokens up to the block's last query
            keys = prune_rows_prefix(key if held == key.shape[2] else key[:, :, :held], lags, self.key_sparsity, fp8)
            values = prune_rows_prefix(value if held == value.shape[2] else value[:, :, :held], lags,
                                       self.value_sparsity, fp8)
            window = (keys, values) if keys.shape[2] else (None, None)  # window 0: every token is in the store
            block_query, block_mask = query, mask
            if len(blocks) > 1:
                block_query = query[:, :, start:stop]
                block_mask = None if mask is None else mask[..., start:stop, :end] if mask.shape[-2] == n else \
                    mask[..., :end]
            outputs.append(decode_attention_unchecked(block_query, *stores, *window, scale, self.backend, block_mask))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    # ------------------------------------------------------------------ sizes
    @property
    def stored_tokens(self) -> int:
        """Tokens in the compressed store."""
        return self.key_store.tokens if self.is_initialized else 0

    def get_seq_length(self) -> int:
        """Tokens held: compressed store + local window (left padding included)."""
        return self.stored_tokens + self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask for ``query_length`` new tokens: every token is attended."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        """``-1``: the cache grows without bound."""
        return -1

    def _total(self, store_attr: str, window_bytes: Callable[[torch.Tensor], int]) -> int:
        if not self.is_initialized:
            return 0
        stores = getattr(self.key_store, store_attr) + getattr(self.value_store, store_attr)
        return stores + window_bytes(self.keys) + window_bytes(self.values)

    nbytes = property(lambda self: self._total("nbytes", _held_bytes),
                      doc="Bytes of the tokens held: store values + bitmaps (+ FP8 scales), K and V, + the window.")
    dense_nbytes = property(lambda self: self._total("dense_nbytes", _held_bytes),
                            doc="Bytes a dense cache of the same tokens would hold (same dtype).")
    allocated_nbytes = property(lambda self: self._total("allocated_nbytes", lambda t: t.untyped_storage().nbytes()),
                                doc="Bytes allocated: store capacity (room not yet used included) + the window.")

    # ------------------------------------------------------------------ edits
    def reset(self) -> None:
        """Drop every token and the reader; the next update starts a new sequence (any batch size)."""
        self.keys = self.values = self.key_store = self.value_store = None
        self.pads, self._reader, self._padding_from, self._reader_config = [], None, None, None
        self._before_eviction = None
        self.is_initialized = self._unconsumed = self._pending = False

    def offload(self) -> None:
        """Not supported: raises ``NotImplementedError`` (the compressed store has no CPU offloading)."""
        raise NotImplementedError(NO_OFFLOADING)

    prefetch = offload

    def crop_check(self, tokens_to_remove: int) -> int:
        """The number of tokens :meth:`crop` keeps for ``tokens_to_remove``; raises if that crop is not exact.

        Raises:
            TypeError: ``tokens_to_remove`` not an int.
            ValueError: the crop would leave pruned tokens that the rule keeps dense.
        """
        n = operator.index(tokens_to_remove)
        total, stored = self.get_seq_length(), self.stored_tokens
        keep = max(0, total + n) if n <= 0 else min(n, total)
        if keep < total and min(stored, keep) > min(boundaries(keep, self.pads, self.window, self.chunk), default=0):
            limit = crop_limit(stored, total, self.pads, self.window, self.chunk)
            raise ValueError(
                f"crop({n}) would keep {keep} of the {total} tokens of MustafarCache layer {self.layer_idx}, but "
                f"{stored} are pruned in its compressed store, more than a cache of {keep} tokens prunes: pruned "
                f"entries cannot be restored. At most {limit} tokens can be removed now (or all of them); call "
                "cache.activate_past_recording() before adding tokens you may remove (assisted decoding does), or "
                "cache.reset()"
            )
        return keep

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (``tokens_to_remove <= 0``, transformers >= 5.18).

        A positive value is the legacy convention of transformers 5.17: keep the first
        ``tokens_to_remove`` tokens. Raises ``ValueError`` where the crop cannot be exact
        (see :meth:`crop_check`).
        """
        if not self.is_initialized:
            operator.index(tokens_to_remove)
            return
        keep, stored = self.crop_check(tokens_to_remove), self.stored_tokens
        if keep < stored:
            self.key_store.truncate(keep)
            self.value_store.truncate(keep)
        self.keys, self.values = self.keys[:, :, : max(0, keep - stored)], self.values[:, :, : max(0, keep - stored)]
        self.pads = [min(p, keep) for p in self.pads]


def _held_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
