"""What the two graph-capturable caches share (``StaticMustafarCache``, ``DenseStaticCache``) and their layers:
a host mirror of the tokens held (``host_length``), a fixed capacity (``max_tokens``), layers made on demand."""

from __future__ import annotations

import torch

from .dynamic import check_layer_idx


class NoEdits:
    """Mixin: ``crop`` and the batch-row edits raise ``NotImplementedError`` (the buffers are allocated once for
    graph replays), with the messages each class names."""

    #: Messages of the ``NotImplementedError`` raised by ``crop`` and by the batch-row edits (set by each class).
    crop_refusal: str
    rows_refusal: str

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported: the buffers are allocated once for graph replays.

        Raises:
            NotImplementedError: always (the message, :attr:`crop_refusal`, names what to use instead).
        """
        raise NotImplementedError(self.crop_refusal)

    def reorder_cache(self, beam_idx) -> None:
        """Not supported (beam search, batch selection or repetition), before or after the prefill.

        Raises:
            NotImplementedError: always (the message, :attr:`rows_refusal`, names what to use instead).
        """
        raise NotImplementedError(self.rows_refusal)

    def batch_select_indices(self, indices) -> None:
        """Not supported: see :meth:`reorder_cache`."""
        raise NotImplementedError(self.rows_refusal)

    def batch_repeat_interleave(self, repeats) -> None:
        """Not supported: see :meth:`reorder_cache`."""
        raise NotImplementedError(self.rows_refusal)


class FixedLengthLayer(NoEdits):
    """Mixin for a layer with attributes ``host_length`` (tokens held, host side), ``max_tokens``, ``decoding``,
    ``_unconsumed``, ``is_initialized`` and a device-side ``length``: no crops, no batch-row edits."""

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

    def reset(self) -> None:
        """Empty the layer (``host_length`` 0, no step pending, device length 0); its buffers are kept."""
        self.host_length, self.decoding, self._unconsumed = 0, False, False
        if self.is_initialized:
            self.length.zero_()


class FixedLengthCache(NoEdits):
    """Mixin for a cache with ``layers`` and ``_new_layer(layer_idx)``: layers made on demand, no crops, no
    batch-row edits."""

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
