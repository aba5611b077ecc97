"""``StaticMustafarCache``: a preallocated compressed cache whose decode step can be captured in a CUDA graph.

Source: Mustafar (Joo et al., arXiv 2505.22913); the static layout is this
project's (see :mod:`mustafar.static_ops`). It is to :class:`~mustafar.MustafarCache`
what transformers' ``StaticCache`` is to ``DynamicCache``: every buffer is
allocated at construction for ``max_tokens``, the decode step has static shapes
and reads the token count on the device, so one step can be captured and
replayed. Semantics are those of ``MustafarCache(window=w, chunk=1)``: after each
step the last ``w`` tokens are dense, every older one is pruned in the store.

Use it in a manual loop (``model(input_ids, past_key_values=cache, position_ids=...)``; pass the
positions explicitly, since graph replays do not advance the host-side token count):
one multi-token prefill on an empty cache, then one-token decode steps. Padded
batches and multi-token steps after the prefill are not supported (``MustafarCache`` is).

Example::

    >>> import torch, transformers, mustafar
    >>> cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar")
    >>> cache = mustafar.StaticMustafarCache(cfg, batch_size=1, max_tokens=64, window=8)
    >>> ids = torch.randint(128, (1, 20))
    >>> logits = model(ids, past_key_values=cache, position_ids=torch.arange(20)[None]).logits
    >>> nxt = logits[:, -1:].argmax(-1)
    >>> logits = model(nxt, past_key_values=cache, position_ids=torch.tensor([[20]])).logits
    >>> int(cache.layers[0].length), cache.get_seq_length()
    (21, 21)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._checks import check_positive_int, check_sparsity
from .attention import Link, link_tensor
from .format import BitmapKV, bytes_per_token, dense_bytes_per_token
from .static_ops import static_decode_attention, static_evict

__all__ = ["StaticMustafarCache", "StaticMustafarLayer"]


class StaticMustafarLayer(CacheLayerMixin):
    """One layer: a store allocated for ``max_tokens - window`` tokens, a ring of ``window`` dense slots.

    Attributes:
        keys, values: the ring ``[batch, kv_heads, window, head_dim]`` (token ``t`` in slot ``t % window``).
        key_store, value_store: :class:`BitmapKV` of the older tokens (whole capacity allocated).
        length: int64 device scalar, tokens held (advanced on the device by each decode step).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, shape, max_tokens, key_sparsity, value_sparsity, window, dtype, device, backend, layer_idx):
        super().__init__()
        batch, kv_heads, head_dim = shape
        self.window, self.max_tokens, self.backend, self.layer_idx = window, max_tokens, backend, layer_idx
        capacity = max(0, max_tokens - window)
        self.key_store = BitmapKV.empty(batch, kv_heads, head_dim, key_sparsity, dtype, device, capacity=capacity)
        self.value_store = BitmapKV.empty(batch, kv_heads, head_dim, value_sparsity, dtype, device, capacity=capacity)
        self.keys = torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = torch.zeros((), dtype=torch.int64, device=device)
        self.dtype, self.device, self.is_initialized = dtype, torch.device(device), True
        self.host_length = 0  # mirror of `length` for eager callers; not advanced by graph replays
        self._unconsumed = False

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing: storage is allocated at construction."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill (``n > 1`` tokens, empty cache: returns them dense) or one decode step (returns the ring).

        Raises:
            ValueError: the previous output was not read by the ``"mustafar"`` attention; states of another
                shape or dtype; a multi-token step on a non-empty cache; more tokens than ``max_tokens``.
        """
        if self._unconsumed:
            raise ValueError(f"StaticMustafarCache layer {self.layer_idx}: the previous update was not read by the "
                             "'mustafar' attention; load the model with attn_implementation=\"mustafar\"")
        self._check_states(key_states, value_states)
        n = key_states.shape[2]
        if self.host_length + n > self.max_tokens:
            raise ValueError(f"StaticMustafarCache holds max_tokens={self.max_tokens}, got "
                             f"{self.host_length} + {n} tokens")
        if n > 1:
            return self._prefill(key_states, value_states)
        static_evict(self.keys, self.key_store, self.length, self.backend)
        static_evict(self.values, self.value_store, self.length, self.backend)
        slot = (self.length % self.window).view(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.length += 1
        self.host_length += 1
        return self._linked(self.keys, self.values, dense=False)

    def _prefill(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.host_length:
            raise ValueError("StaticMustafarCache takes a multi-token step only as the first (prefill) step; "
                             "use MustafarCache for chunked prefill or speculative decoding")
        n = key_states.shape[2]
        stored = max(0, n - self.window)
        if stored:
            self.key_store.append(key_states[:, :, :stored])
            self.value_store.append(value_states[:, :, :stored])
        slots = torch.arange(stored, n, device=self.device) % self.window
        self.keys.index_copy_(2, slots, key_states[:, :, stored:])
        self.values.index_copy_(2, slots, value_states[:, :, stored:])
        self.length.fill_(n)
        self.host_length = n
        return self._linked(key_states, value_states, dense=True)

    def _linked(self, keys, values, dense: bool):
        link_tensor(keys, Link(self, dense))
        self._unconsumed = True
        return keys, values

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
            if (not isinstance(new, torch.Tensor) or new.dim() != 4 or (new.shape[0], new.shape[1], new.shape[3])
                    != expected or new.dtype != self.dtype):
                raise ValueError(f"{name} must be [{expected[0]}, {expected[1]}, n, {expected[2]}] {self.dtype}, "
                                 f"got {tuple(getattr(new, 'shape', ()))} {getattr(new, 'dtype', type(new))}")

    def consume(self) -> None:
        """Mark the output of the last update as read by the ``"mustafar"`` attention."""
        self._unconsumed = False

    def attend(self, query, key, value, scale, attention_mask) -> torch.Tensor:
        """Static decode attention (the mask is not read: no padding in this cache)."""
        return static_decode_attention(query, self.key_store, self.value_store, self.keys, self.values,
                                       self.length, scale=scale, backend=self.backend)

    def get_seq_length(self) -> int:
        """Tokens held (the host mirror; graph replays do not advance it)."""
        return self.host_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.host_length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_tokens

    def reset(self) -> None:
        """Empty the cache (storage kept)."""
        self.length.zero_()
        self.host_length = 0
        self.key_store.truncate(0)
        self.value_store.truncate(0)
        self._unconsumed = False


class StaticMustafarCache(Cache):
    """A preallocated, graph-capturable compressed KV cache (see the module docstring).

    Args:
        config: the model's config (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``).
        batch_size: sequences decoded together.
        max_tokens: prompt + generated tokens the cache must hold.
        key_sparsity, value_sparsity: fraction of each Key / Value vector zeroed, in [0, 1).
        window: dense local window (ring slots), >= 1.
        dtype, device: of the storage (default fp16 and the current CUDA device, else the CPU).
        backend: ``"auto"``, ``"cuda"`` or ``"torch"``.

    Raises:
        ValueError / TypeError: bad sizes or sparsities.
    """

    def __init__(self, config, batch_size: int, max_tokens: int, key_sparsity: float = 0.5,
                 value_sparsity: float = 0.5, window: int = 32, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: str = "auto"):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        shape = (check_positive_int("batch_size", batch_size), getattr(text, "num_key_value_heads", heads), head_dim)
        check_positive_int("max_tokens", max_tokens)
        check_positive_int("window", window)
        ks, vs = check_sparsity("key_sparsity", key_sparsity), check_sparsity("value_sparsity", value_sparsity)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        layers = [StaticMustafarLayer(shape, max_tokens, ks, vs, window, dtype, device, backend, i)
                  for i in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
        self.key_sparsity, self.value_sparsity, self.window, self.max_tokens = ks, vs, window, max_tokens

    def __repr__(self) -> str:
        return (f"StaticMustafarCache(K{self.key_sparsity:g}V{self.value_sparsity:g}, window={self.window}, "
                f"max_tokens={self.max_tokens}, layers={len(self.layers)})")

    def _bytes(self, store_bytes) -> int:
        return sum(store_bytes(layer) for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (host mirror): store rows used + the ring's used slots, K and V."""
        def held(layer):
            b, h, _, d = layer.keys.shape
            stored = max(0, layer.host_length - self.window)
            rows = sum(bytes_per_token(d, s.sparsity, s.dtype) for s in (layer.key_store, layer.value_store))
            dense = 2 * min(layer.host_length, self.window) * dense_bytes_per_token(d, layer.dtype)
            return b * h * (stored * rows + dense)
        return self._bytes(held)

    @property
    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same tokens would hold."""
        return self._bytes(lambda layer: 2 * layer.host_length * layer.keys[:, :, 0].numel() * layer.keys.element_size())

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated for the whole ``max_tokens`` (stores + rings)."""
        return self._bytes(lambda layer: layer.key_store.allocated_nbytes + layer.value_store.allocated_nbytes
                           + 2 * layer.keys.numel() * layer.keys.element_size())
