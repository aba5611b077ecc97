"""``MustafarCache``: a transformers ``Cache`` with a dense local window and a bitmap-compressed store.

Source: Mustafar (Joo et al., arXiv 2505.22913) prunes every Key (after RoPE)
and Value vector per token by magnitude and keeps the most recent tokens dense
(the local window, the paper's residual length). Each layer holds, in token
order, a **compressed store** (two :class:`~mustafar.format.BitmapKV`, K and V:
the oldest tokens, pruned once when they enter it) and the **local window**
(dense ``layer.keys`` / ``layer.values``, ``[batch, kv_heads, w, head_dim]``).

Policy, one rule for prefill and decode: after every update, while the window
holds ``window + chunk`` tokens or more, its oldest ``chunk`` tokens move to the
store. The window thus keeps ``window`` to ``window + chunk - 1`` tokens (fewer
while the sequence is shorter, or after a ``crop``), the store grows by whole
chunks (at prefill: the largest multiple of ``chunk`` that leaves ``window``
tokens, as the paper's code does with its residual length), and no token is
ever dropped or reordered.

Attention must run through the ``"mustafar"`` implementation (registered on
``import mustafar``, see :mod:`mustafar.attention`); with any other, the first
decode step raises ``ValueError``.

Example::

    >>> import torch, transformers, mustafar
    >>> cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar")
    >>> cache = mustafar.MustafarCache(0.5, 0.5, window=8, chunk=16)
    >>> _ = model.generate(torch.randint(128, (1, 40)), past_key_values=cache, max_new_tokens=10, do_sample=False)
    >>> cache.get_seq_length(), cache.layers[0].stored_tokens, round(cache.nbytes / cache.dense_nbytes, 3)
    (49, 32, 0.755)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._checks import check_positive_int, check_sparsity
from .attention import Link, held_mask, link_tensor
from .config import SparsityConfig
from .format import BitmapKV
from .ops import BACKENDS, sparse_decode_attention

__all__ = ["LayerSparsity", "MustafarCache", "MustafarLayer"]

#: Per-layer sparsities: a sequence of ``(key_sparsity, value_sparsity)`` or ``layer_idx -> (ks, vs)``.
LayerSparsity = Sequence[tuple[float, float]] | Callable[[int], tuple[float, float]]


class MustafarLayer(CacheLayerMixin):
    """One layer of :class:`MustafarCache`: a compressed store and a dense local window.

    Attributes:
        keys, values: the local window, ``[batch, kv_heads, w, head_dim]``, the cache dtype.
        key_store, value_store: :class:`BitmapKV` of the older tokens (``None`` before the first update).
        key_sparsity, value_sparsity: fraction of each Key / Value vector zeroed in the store, in [0, 1).
        window, chunk, backend: see :class:`MustafarCache`; layer_idx: the model layer (for messages).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        key_sparsity: float,
        value_sparsity: float,
        window: int,
        chunk: int,
        backend: str = "auto",
        layer_idx: int = 0,
    ):
        super().__init__()
        self.key_sparsity = check_sparsity("key_sparsity", key_sparsity)
        self.value_sparsity = check_sparsity("value_sparsity", value_sparsity)
        self.window = check_positive_int("window", window, minimum=0)
        self.chunk = check_positive_int("chunk", chunk)
        self.backend, self.layer_idx = _check_backend(backend), layer_idx
        self.key_store: BitmapKV | None = None
        self.value_store: BitmapKV | None = None
        self._unconsumed = False

    def __repr__(self) -> str:
        return (
            f"MustafarLayer({self.layer_idx}, K{self.key_sparsity:g}V{self.value_sparsity:g}, window={self.window}"
            f", chunk={self.chunk}, stored={self.stored_tokens}, tokens={self.get_seq_length()})"
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the empty window and stores on the device and in the dtype of the states."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        b, h, _, dk = key_states.shape
        dv = value_states.shape[-1]
        self.key_store = BitmapKV.empty(b, h, dk, self.key_sparsity, dtype=key_states.dtype, device=self.device)
        self.value_store = BitmapKV.empty(b, h, dv, self.value_sparsity, dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``key_states``/``value_states`` ``[batch, kv_heads, n, head_dim]``; return dense K, V.

        Returns every token held, unpruned, when the store was empty before this
        update and ``n > 1`` (prefill) or no token moved: the attention runs dense
        SDPA on them. Otherwise returns the local window, new tokens included, and
        the attention reads the store besides.

        Raises:
            ValueError: the previous output was not read by the ``"mustafar"``
                attention implementation, or the states do not match the cached ones.
        """
        if self._unconsumed:
            raise ValueError(
                f"MustafarCache layer {self.layer_idx}: the keys returned by the previous update were not read by the "
                "'mustafar' attention implementation, so attention would miss the compressed tokens. Load the model "
                'with attn_implementation="mustafar" (or call model.set_attn_implementation("mustafar")) after '
                "`import mustafar`"
            )
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        was_empty = self.key_store.tokens == 0
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        moved = self._move_to_store(keys, values)
        dense = was_empty and (key_states.shape[-2] > 1 or moved == 0)
        out_keys, out_values = (keys, values) if dense else (self.keys, self.values)
        link_tensor(out_keys, Link(self, dense))
        self._unconsumed = True
        return out_keys, out_values

    def _move_to_store(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Keep ``keys``/``values`` as the window, moving its oldest whole chunks to the store; return tokens moved."""
        moved = max(0, (keys.shape[-2] - self.window) // self.chunk) * self.chunk
        if moved == 0:
            self.keys, self.values = keys, values
            return 0
        self.key_store.append(keys[:, :, :moved])
        self.value_store.append(values[:, :, :moved])
        self.keys, self.values = keys[:, :, moved:].clone(), values[:, :, moved:].clone()
        return moved

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(new, torch.Tensor) or new.dim() != 4:
                raise ValueError(
                    f"{name} must be a 4-d tensor [batch, kv_heads, n, head_dim], got {type(new).__name__}"
                    f" {tuple(getattr(new, 'shape', ()))}"
                )
            old = None if not self.is_initialized else self.keys if name == "key_states" else self.values
            if old is not None and (
                new.shape[:2] != old.shape[:2] or new.shape[3:] != old.shape[3:] or new.dtype != old.dtype
            ):
                raise ValueError(
                    f"{name} must be [{old.shape[0]}, {old.shape[1]}, n, {old.shape[3]}] {old.dtype} like the cached "
                    f"tokens (call cache.reset() for a new batch), got {tuple(new.shape)} {new.dtype}"
                )

    def consume(self) -> None:
        """Mark the output of the last :meth:`update` as read by the ``"mustafar"`` attention."""
        self._unconsumed = False

    def attend(self, query, key, value, scale, attention_mask) -> torch.Tensor:
        """Decode attention of ``query [b, q_heads, q_len, d]`` over the store and the window ``key``/``value``.

        ``attention_mask`` covers every token held (longer masks are cut). Returns ``[b, q_heads, q_len, d]``.
        """
        mask = held_mask(attention_mask, self.get_seq_length())
        window = (key, value) if key.shape[2] else (None, None)  # window 0: every token is in the store
        return sparse_decode_attention(
            query, self.key_store, self.value_store, *window, scale=scale, backend=self.backend, attention_mask=mask
        )

    # ------------------------------------------------------------------ sizes
    @property
    def stored_tokens(self) -> int:
        """Tokens in the compressed store."""
        return self.key_store.tokens if self.is_initialized else 0

    def get_seq_length(self) -> int:
        """Tokens held: compressed store + local window."""
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

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held: store values + bitmaps (K and V) + the dense window."""
        return self._total("nbytes", _held_bytes)

    @property
    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same tokens would hold (same dtype)."""
        return self._total("dense_nbytes", _held_bytes)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated: store capacity (room not yet used included) + the window's storage."""
        return self._total("allocated_nbytes", lambda t: t.untyped_storage().nbytes())

    # ------------------------------------------------------------------ edits
    def reset(self) -> None:
        """Drop every token; the next update starts a new sequence (any batch size)."""
        self.keys = self.values = self.key_store = self.value_store = None
        self.is_initialized = self._unconsumed = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (``tokens_to_remove < 0``, transformers >= 5.18).

        A positive value is the legacy convention of transformers 5.17: keep the
        first ``tokens_to_remove`` tokens. A crop into the store truncates it
        (kept tokens stay pruned; the window may then hold fewer than ``window``).
        """
        n = operator.index(tokens_to_remove)
        if not self.is_initialized or n == 0:
            return
        total, stored = self.get_seq_length(), self.stored_tokens
        keep = max(0, total + n) if n < 0 else min(n, total)
        if keep < stored:
            self.key_store.truncate(keep)
            self.value_store.truncate(keep)
        self.keys, self.values = self.keys[:, :, : max(0, keep - stored)], self.values[:, :, : max(0, keep - stored)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep (reorder, repeat) the batch rows ``beam_idx`` (beam search)."""
        if not self.is_initialized:
            return
        index = beam_idx.to(device=self.device, dtype=torch.long)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.key_store.select_batch(index)
        self.value_store.select_batch(index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (``torch.repeat_interleave`` order)."""
        if self.is_initialized:
            self.reorder_cache(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (an index or bool tensor, or a list)."""
        if self.is_initialized:
            self.reorder_cache(torch.arange(self.keys.shape[0], device=self.device)[indices])


class MustafarCache(Cache):
    """A transformers ``Cache`` that prunes and compresses all but the most recent tokens (arXiv 2505.22913).

    Args:
        key_sparsity, value_sparsity: fraction of each Key / Value vector zeroed
            (per token and head, by magnitude), in [0, 1).
        window: tokens kept dense at the end of the sequence (the local window), >= 0.
        chunk: tokens moved from the window to the compressed store at once, >= 1.
        layer_sparsity: per-layer ``(key_sparsity, value_sparsity)``, a sequence
            indexed by layer or a callable ``layer_idx -> pair``; overrides the two above.
        backend: decode attention backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Storage lives on the device and in the dtype of each layer's keys. Sizes in
    bytes: :attr:`nbytes` (held), :attr:`dense_nbytes`, :attr:`allocated_nbytes`.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range.
    """

    is_compileable = False

    def __init__(
        self,
        key_sparsity: float = 0.5,
        value_sparsity: float = 0.5,
        window: int = 32,
        chunk: int = 256,
        *,
        layer_sparsity: LayerSparsity | None = None,
        backend: str = "auto",
    ):
        if isinstance(key_sparsity, SparsityConfig):
            raise TypeError("key_sparsity must be a float; for a SparsityConfig use MustafarCache.from_config(config)")
        self.config = SparsityConfig(key_sparsity, value_sparsity, window, chunk)
        self.backend = _check_backend(backend)
        self.layer_sparsity = _check_layer_sparsity(layer_sparsity)
        super().__init__(layers=[])

    @classmethod
    def from_config(cls, config: SparsityConfig, **kwargs) -> MustafarCache:
        """A cache for a :class:`~mustafar.config.SparsityConfig` (``method`` must be ``"per-token"``)."""
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a mustafar.SparsityConfig, got {type(config).__name__}")
        if config.method != "per-token":
            raise ValueError(
                f"config.method must be 'per-token' (the only rule MustafarCache stores), got {config.method!r}"
            )
        return cls(config.key_sparsity, config.value_sparsity, config.window, config.chunk, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return f"MustafarCache({c.name}, window={c.window}, chunk={c.chunk}, layers={len(self.layers)})"

    def sparsity_of(self, layer_idx: int) -> tuple[float, float]:
        """``(key_sparsity, value_sparsity)`` of layer ``layer_idx``."""
        if self.layer_sparsity is None:
            return self.config.key_sparsity, self.config.value_sparsity
        if callable(self.layer_sparsity):
            return _check_pair(f"layer_sparsity({layer_idx})", self.layer_sparsity(layer_idx))
        if layer_idx >= len(self.layer_sparsity):
            raise ValueError(
                f"layer_sparsity must have an entry for every layer: got {len(self.layer_sparsity)} "
                f"entries, the model has a layer {layer_idx}"
            )
        return self.layer_sparsity[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append new tokens to layer ``layer_idx`` (creating layers as needed); see :meth:`MustafarLayer.update`."""
        while len(self.layers) <= layer_idx:
            ks, vs = self.sparsity_of(len(self.layers))
            c = self.config
            self.layers.append(MustafarLayer(ks, vs, c.window, c.chunk, self.backend, layer_idx=len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """``-1``: no maximum length."""
        return -1

    nbytes = property(
        lambda self: sum(layer.nbytes for layer in self.layers),
        doc="KV bytes held by the tokens, all layers: compressed values + bitmaps + dense window.",
    )
    dense_nbytes = property(
        lambda self: sum(layer.dense_nbytes for layer in self.layers),
        doc="Bytes a dense cache of the same tokens would hold, all layers.",
    )
    allocated_nbytes = property(
        lambda self: sum(layer.allocated_nbytes for layer in self.layers),
        doc="Bytes allocated, all layers, capacity not yet used included.",
    )


def _check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _held_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _check_pair(name: str, pair: object) -> tuple[float, float]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a (key_sparsity, value_sparsity) pair, got {pair!r}")
    return check_sparsity(f"{name}[0] (key sparsity)", pair[0]), check_sparsity(f"{name}[1] (value sparsity)", pair[1])


def _check_layer_sparsity(layer_sparsity: object) -> LayerSparsity | None:
    if layer_sparsity is None or callable(layer_sparsity):
        return layer_sparsity
    if isinstance(layer_sparsity, (str, bytes)) or not isinstance(layer_sparsity, Sequence):
        raise TypeError(
            "layer_sparsity must be a sequence of (key_sparsity, value_sparsity) pairs or a callable "
            f"layer_idx -> pair, got {type(layer_sparsity).__name__}"
        )
    return [_check_pair(f"layer_sparsity[{i}]", pair) for i, pair in enumerate(layer_sparsity)]
