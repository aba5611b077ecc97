"""What the two graph-capturable caches share (``StaticMustafarCache``, ``DenseStaticCache``) and their layers:
a host mirror of the tokens held (``host_length``), a fixed capacity (``max_tokens``), layers made on demand."""

from __future__ import annotations

import torch

from .dynamic import check_layer_idx


class FixedLengthLayer:
    """Mixin for a layer with attributes ``host_length`` (tokens held, host side) and ``max_tokens``."""

    host_length: int
    max_tokens: int

    def get_seq_length(self) -> int:
        """Tokens held (the host mirror; graph replays do not advance it)."""
        return self.host_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask; a prefill chunk on a non-empty cache gets
        ``query_length``: this cache's attention reads no mask, and a causal square needs none
        (transformers then builds none, instead of a ``batch x chunk x held`` bool tensor)."""
        if isinstance(query_length, torch.Tensor):  # older transformers pass the cache positions
            query_length = query_length.shape[-1]
        if query_length > 1 and self.host_length:
            return query_length, 0
        return self.host_length + query_length, 0

    def get_max_length(self) -> int:
        """The capacity in tokens."""
        return self.max_tokens


class FixedLengthCache:
    """Mixin for a cache with ``layers`` and ``_new_layer(layer_idx)``: layers made on demand, no crops."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write into layer ``layer_idx`` (an int >= 0; created if needed); see the layer's ``update``.

        Raises:
            TypeError / ValueError: ``layer_idx`` not an int >= 0; the layer's own checks.
        """
        layer_idx = check_layer_idx(layer_idx)
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    @property
    def is_croppable(self) -> bool:
        """``False``: no crops (transformers' assisted decoding checks it)."""
        return False
