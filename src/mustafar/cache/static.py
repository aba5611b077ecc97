"""``StaticMustafarCache``: a preallocated compressed cache whose decode step can be captured in a CUDA graph.

Source: Mustafar (Joo et al., arXiv 2505.22913); the static layout is this
project's (see :mod:`mustafar.cache.static_ops`). It is to :class:`~mustafar.MustafarCache`
what transformers' ``StaticCache`` is to ``DynamicCache``: every buffer is
allocated once for ``max_tokens``, the decode step has static shapes and reads
the token count on the device, so one step can be captured and replayed.
Semantics are those of ``MustafarCache(window=w, chunk=1)``: after each step the
last ``w`` tokens are dense, every older one is pruned in the store.

Allocation is lazy, per layer, at the layer's first update (the eager prefill):
shape, dtype and device come from that layer's ``key_states``. So each layer's
storage sits on the device of its own keys (``device_map`` may spread layers over
several GPUs), and under tensor parallelism each rank holds only the KV heads it
computes (``num_key_value_heads / tp_size``), not the config's count (issue 6).
Nothing is allocated before the prefill (:attr:`~StaticMustafarCache.allocated_nbytes` is 0);
the prefill must run eagerly, outside any CUDA graph capture.

Use it in a manual loop (``model(input_ids, past_key_values=cache, position_ids=...)``; pass the
positions explicitly, since graph replays do not advance the host-side token count):
a prefill in one multi-token step or in several chunks (each chunk attends to every
token before it, the older ones pruned as decoding reads them), then one-token decode
steps. Padded batches, multi-token steps after the first decode step, ``crop`` (hence
assisted decoding: ``is_croppable`` is False) and batch-row edits (``reorder_cache``: beam
search) raise (``MustafarCache`` supports them).

A decode step's bookkeeping (evict the oldest window token into the store, write the new
one into the ring, advance ``length``) is one Triton launch per layer on CUDA
(:mod:`mustafar.kernels.bookkeeping`; issue 14), bit-identical to the unfused ops that
serve elsewhere (and when :data:`FUSED_ENV` is ``0``).

Example::

    >>> import torch, transformers, mustafar
    >>> cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar")
    >>> cache = mustafar.StaticMustafarCache(cfg, batch_size=1, max_tokens=64, window=8)
    >>> cache.allocated_nbytes  # nothing before the prefill
    0
    >>> ids = torch.randint(128, (1, 20))
    >>> logits = model(ids, past_key_values=cache, position_ids=torch.arange(20)[None]).logits
    >>> nxt = logits[:, -1:].argmax(-1)
    >>> logits = model(nxt, past_key_values=cache, position_ids=torch.tensor([[20]])).logits
    >>> int(cache.layers[0].length), cache.get_seq_length(), cache.layers[0].keys.shape
    (21, 21, torch.Size([1, 2, 8, 16]))
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .._checks import CACHE_DTYPES, check_positive_int, check_sparsity
from ..attention import Link, link_tensor
from ..format import BitmapKV, bytes_per_token, dense_bytes_per_token
from ..fp8 import check_kept_dtype, is_fp8
from ..model_support import check_attention_implementation
from ..ops import append
from .dynamic import check_backend
from .fixed_length import FixedLengthCache, FixedLengthLayer
from .rules import pads_from_mask
from .static_ops import static_decode_attention
from .static_steps import CHUNK_GROUP_BYTES, FUSED_ENV, StaticSteps

__all__ = ["StaticMustafarCache", "StaticMustafarLayer", "FUSED_ENV", "CHUNK_GROUP_BYTES"]


#: Message of the ``NotImplementedError`` raised by ``crop``.
_NO_CROP = ("StaticMustafarCache cannot crop (remove tokens): each decode step prunes the oldest window token into "
            "the store for good; use MustafarCache (which crops, and serves assisted decoding) or cache.reset()")
#: Message of the ``NotImplementedError`` raised by the batch-row edits (beam search, batch selection).
_NO_ROWS = ("StaticMustafarCache cannot reorder, select or repeat batch rows (beam search): its buffers are allocated "
            "once for graph replays; use MustafarCache")


class StaticMustafarLayer(StaticSteps, FixedLengthLayer, CacheLayerMixin):
    """One layer: a store for ``max_tokens - window`` tokens and a ring of ``window`` dense slots.

    Both are allocated at the first :meth:`update`, like its ``key_states`` (batch, KV heads,
    head_dim, dtype, device); ``batch_size``, ``dtype`` and ``device`` (its type only), when given,
    are checked against those states. Before the first update ``keys``, ``values``, the stores
    and ``length`` are ``None``.

    Attributes:
        keys, values: the ring ``[batch, kv_heads, window, head_dim]`` (token ``t`` in slot ``t % window``).
        key_store, value_store: :class:`BitmapKV` of the older tokens (whole capacity allocated).
        length: int64 device scalar, tokens held (advanced on the device by each decode step).
    """

    crop_refusal, rows_refusal = _NO_CROP, _NO_ROWS

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, max_tokens: int, key_sparsity: float, value_sparsity: float, window: int,
                 backend: str = "auto", layer_idx: int = 0, *, batch_size: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 kept_dtype: torch.dtype | None = None):
        super().__init__()
        self.kept_dtype = check_kept_dtype(kept_dtype, dtype)
        self.max_tokens, self.window, self.backend, self.layer_idx = max_tokens, window, backend, layer_idx
        self.key_sparsity, self.value_sparsity = key_sparsity, value_sparsity
        self.expected_batch, self.expected_dtype = batch_size, dtype
        self.expected_device_type = None if device is None else torch.device(device).type
        self.key_store = self.value_store = self.length = self.counter = None
        self.host_length = 0  # mirror of `length` for eager callers; not advanced by graph replays
        self.decoding = self._unconsumed = False
        self._chunk_history = None  # what the attention of the last prefill chunk reads (see _chunk)
        self._reader_config = None  # config of the reader module: which attention reads the next update

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the ring, the stores (whole capacity) and ``length`` like ``key_states``.

        Raises:
            ValueError: called while a CUDA graph is being captured (run the prefill eagerly first).
        """
        if key_states.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"StaticMustafarCache layer {self.layer_idx} allocates its storage at its first update: "
                             "run the prefill eagerly before capturing a decode step in a CUDA graph")
        batch, kv_heads, _, head_dim = key_states.shape
        dtype, device = key_states.dtype, key_states.device
        capacity = max(0, self.max_tokens - self.window)
        kept = self.kept_dtype
        self.key_store = BitmapKV.empty(batch, kv_heads, head_dim, self.key_sparsity, dtype, device, capacity=capacity,
                                        kept_dtype=kept)
        self.value_store = BitmapKV.empty(batch, kv_heads, head_dim, self.value_sparsity, dtype, device,
                                          capacity=capacity, kept_dtype=kept)
        self.keys = torch.zeros(batch, kv_heads, self.window, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = torch.zeros((), dtype=torch.int64, device=device)
        self.counter = torch.zeros((), dtype=torch.int32, device=device)  # of the fused bookkeeping kernel
        self.dtype, self.device, self.is_initialized = dtype, device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill (``n > 1`` tokens: dense on an empty cache, else a chunk, see :meth:`_chunk`) or one decode step.

        The first update allocates the storage (:meth:`lazy_initialization`); a decode step after it
        allocates only per-token temporaries and reads nothing on the host.

        Raises:
            ValueError: the model now runs another attention than ``"mustafar"`` (refused before any change:
                :func:`mustafar.model_support.check_attention_implementation`); the previous output was not read
                by the ``"mustafar"`` attention; states of another shape, dtype or device type; a multi-token step
                after a one-token decode step; more tokens than ``max_tokens``.
            NotImplementedError: a prefill batch that is a multiple of ``batch_size`` (``generate()`` repeats
                the batch for beam search: not supported, see :meth:`StaticMustafarCache.reorder_cache`).
        """
        check_attention_implementation(self.layer_idx, self._reader_config, cache="StaticMustafarCache")
        if self._unconsumed:
            raise ValueError(f"StaticMustafarCache layer {self.layer_idx}: the previous update was not read by the "
                             "'mustafar' attention; call cache.reset(), load the model with "
                             "attn_implementation=\"mustafar\" and run the prompt again")
        self._check_states(key_states, value_states)
        n = key_states.shape[2]
        if n == 0:
            raise ValueError(f"key_states must hold at least one token (dim 2), got shape {tuple(key_states.shape)}")
        if self.host_length + n > self.max_tokens:
            raise ValueError(f"StaticMustafarCache holds max_tokens={self.max_tokens}, got "
                             f"{self.host_length} + {n} tokens")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if n > 1:
            return self._prefill(key_states, value_states)
        self.decoding = self.decoding or self.host_length > 0  # one token on an empty cache: a prefill
        self._bookkeeping(key_states, value_states)
        self.host_length += 1
        return self._linked(self.keys, self.values, dense=False)

    def _prefill(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.decoding:
            raise ValueError("StaticMustafarCache takes multi-token steps (the prefill, whole or chunked) only "
                             "before the first one-token decode step; use MustafarCache for speculative decoding")
        if self.host_length:
            return self._chunk(key_states, value_states)
        n = key_states.shape[2]
        stored = max(0, n - self.window)
        if stored:
            append(self.key_store, key_states[:, :, :stored])
            append(self.value_store, value_states[:, :, :stored])
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

    def _expected(self, key_states: torch.Tensor) -> tuple[tuple[int, int, int], torch.dtype]:
        """``((batch, kv_heads, head_dim), dtype)`` the states must have: the storage's, else the first keys'."""
        if self.is_initialized:
            return (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]), self.dtype
        batch, kv_heads, _, head_dim = key_states.shape
        return (self.expected_batch or batch, kv_heads, head_dim), self.expected_dtype or key_states.dtype

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(new, torch.Tensor) or new.dim() != 4:
                raise ValueError(f"{name} must be a 4-d tensor [batch, kv_heads, n, head_dim], got "
                                 f"{type(new).__name__} {tuple(getattr(new, 'shape', ()))}")
        shape, dtype = self._expected(key_states)
        batch = key_states.shape[0]
        if not self.is_initialized and batch != shape[0] and batch % shape[0] == 0:
            raise NotImplementedError(
                f"{_NO_ROWS}. The prefill has {batch} rows, {batch // shape[0]} times batch_size={shape[0]}: "
                "generate() repeats the batch for num_beams > 1 (beam search) or num_return_sequences > 1; for "
                f"sampling with num_return_sequences, pass batch_size={batch}"
            )
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            if (new.shape[0], new.shape[1], new.shape[3]) != shape or new.dtype != dtype \
                    or new.shape[2] != key_states.shape[2]:
                raise ValueError(f"{name} must be [{shape[0]}, {shape[1]}, n, {shape[2]}] {dtype}, "
                                 f"got {tuple(new.shape)} {new.dtype}")
        if self.is_initialized:
            if key_states.device != self.device or value_states.device != self.device:
                raise ValueError(f"key_states and value_states must be on the device of StaticMustafarCache layer "
                                 f"{self.layer_idx}, {self.device}, got {key_states.device} and {value_states.device}")
            return
        device_type = self.expected_device_type or key_states.device.type
        if key_states.device.type != device_type or value_states.device != key_states.device:
            raise ValueError(f"key_states and value_states must be on one {device_type} device, got "
                             f"{key_states.device} and {value_states.device}")

    def consume(self, module=None, attention_mask: torch.Tensor | None = None) -> None:
        """Mark the output of the last update as read by the ``"mustafar"`` attention.

        Raises:
            ValueError: the prefill's ``attention_mask`` pads a row (this cache ignores masks; use MustafarCache).
        """
        self._unconsumed = False
        if module is not None:
            self._reader_config = getattr(module, "config", None)
        tokens = self.host_length
        prefill = attention_mask is not None and tokens > 1 and attention_mask.shape[-2] == tokens
        if prefill and any(pads_from_mask(attention_mask, self.keys.shape[0], tokens)):
            raise ValueError("StaticMustafarCache does not support padded batches (its decode attention reads "
                             "no mask): the prefill's attention_mask pads a row; use MustafarCache")

    def attend(self, query, key, value, scale, attention_mask) -> torch.Tensor:
        """Static decode attention, or a prefill chunk's (the mask is not read: no padding in this cache)."""
        if query.shape[2] > 1:
            return self._chunk_attention(query, key, value, scale)
        return static_decode_attention(query, self.key_store, self.value_store, self.keys, self.values,
                                       self.length, scale=scale, backend=self.backend)

    def reset(self) -> None:
        """Empty the cache; allocated storage is kept (same batch, heads, dtype and device next time)."""
        super().reset()
        if self.is_initialized:
            self.key_store.truncate(0)
            self.value_store.truncate(0)


class StaticMustafarCache(FixedLengthCache, Cache):
    """A graph-capturable compressed KV cache, allocated per layer at the prefill (see the module docstring).

    Args:
        config: the model's config, optional: only its ``num_hidden_layers`` is read, to create the
            layer objects up front (without it they are created at their first update). Its KV head
            count is not used: each layer takes its heads from its keys (tensor parallelism slices them).
        batch_size: optional; if given, the prefill's batch must equal it.
        max_tokens: prompt + generated tokens the cache must hold (required).
        key_sparsity, value_sparsity: fraction of each Key / Value vector zeroed, in [0, 1).
        window: dense local window (ring slots), >= 1.
        dtype: optional; if given, the keys must have it. The storage always takes the keys' dtype.
        device: optional; if given, the keys must be on a device of its type (``"cuda"``: any GPU, so
            that ``device=model.device`` also works for layers that ``device_map`` put on other GPUs).
            The storage always sits on each layer's own key device.
        backend: ``"auto"``, ``"cuda"`` or ``"torch"`` (``"triton"`` uses the reference).
        kept_dtype: ``None`` (the cache dtype, default) or ``torch.float8_e4m3fn``: kept values in e4m3 with
            one scale per token and head (``max kept |x| / 448``, :mod:`mustafar.fp8`); the CUDA kernels
            compress and decode them (decode on compute capability >= 8.9, else ``"auto"`` uses the reference).

    Raises:
        ValueError / TypeError: bad sizes, sparsities, dtype or backend; at the prefill, keys that
        contradict ``batch_size``, ``dtype`` or ``device``.
        mustafar.ops.UnsupportedHardwareError: ``backend`` ``"triton"`` or ``"cuda"`` where it cannot run.
    """

    crop_refusal, rows_refusal = _NO_CROP, _NO_ROWS

    is_compileable = False

    def __init__(self, config=None, batch_size: int | None = None, max_tokens: int | None = None,
                 key_sparsity: float = 0.5, value_sparsity: float = 0.5, window: int = 32,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None, backend: str = "auto",
                 kept_dtype: torch.dtype | None = None):
        if max_tokens is None:
            raise TypeError("StaticMustafarCache needs max_tokens: the prompt + generated tokens it must hold")
        if dtype is not None and dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be None or one of {CACHE_DTYPES}, got {dtype!r}")
        backend = check_backend(backend)
        self.max_tokens = check_positive_int("max_tokens", max_tokens)
        self.window = check_positive_int("window", window)
        self.key_sparsity = check_sparsity("key_sparsity", key_sparsity)
        self.value_sparsity = check_sparsity("value_sparsity", value_sparsity)
        batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        self.kept_dtype = check_kept_dtype(kept_dtype, dtype)
        self._expect = dict(batch_size=batch_size, dtype=dtype, device=None if device is None else torch.device(device),
                            kept_dtype=self.kept_dtype)
        self.backend = backend
        super().__init__(layers=[self._new_layer(i) for i in range(config_layers(config))])

    def _new_layer(self, layer_idx: int) -> StaticMustafarLayer:
        return StaticMustafarLayer(self.max_tokens, self.key_sparsity, self.value_sparsity, self.window,
                                   self.backend, layer_idx, **self._expect)

    def __repr__(self) -> str:
        return (f"StaticMustafarCache(K{self.key_sparsity:g}V{self.value_sparsity:g}, window={self.window}, "
                f"max_tokens={self.max_tokens}{', kept_dtype=float8_e4m3fn' if is_fp8(self.kept_dtype) else ''}, "
                f"layers={len(self.layers)})")

    def _bytes(self, layer_bytes) -> int:
        return sum(layer_bytes(layer) for layer in self.layers if layer.is_initialized)

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (host mirror): store rows used + the ring's used slots, K and V."""
        def held(layer):
            b, h, _, d = layer.keys.shape
            stored = max(0, layer.host_length - self.window)
            rows = sum(bytes_per_token(d, s.sparsity, s.dtype, s.kept_dtype)
                       for s in (layer.key_store, layer.value_store))
            dense = 2 * min(layer.host_length, self.window) * dense_bytes_per_token(d, layer.dtype)
            return b * h * (stored * rows + dense)
        return self._bytes(held)

    @property
    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same tokens would hold."""
        return self._bytes(lambda layer: 2 * layer.host_length * layer.keys[:, :, 0].numel()
                           * layer.keys.element_size())

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated (stores for ``max_tokens`` + rings), all layers; 0 before the prefill."""
        return self._bytes(lambda layer: layer.key_store.allocated_nbytes + layer.value_store.allocated_nbytes
                           + 2 * layer.keys.numel() * layer.keys.element_size())


def config_layers(config) -> int:
    """``num_hidden_layers`` of ``config`` (its text config for multimodal ones), 0 for ``None``."""
    if config is None:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise TypeError(f"config must be a transformers config with num_hidden_layers >= 1, "
                        f"got {type(config).__name__}")
    return layers
