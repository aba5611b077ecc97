"""What the two graph-capturable layers share (``StaticMustafarLayer``, ``DenseStaticLayer``): a host mirror of
the tokens held (``host_length``) and a fixed capacity (``max_tokens``)."""

from __future__ import annotations

import torch


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
