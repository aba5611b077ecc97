"""``DenseStaticCache``: the fair dense baseline of a graph-captured decode step.

What a serving engine does with a dense KV cache, in transformers' ``Cache`` API:
every layer preallocates ``[batch, kv_heads, max_tokens, head_dim]`` keys and
values, writes each new token in place at a device-side position (``length``, an
int64 device scalar advanced on the device), and its decode attention reads
**exactly the tokens held**: SDPA (torch's default backend) over
``keys[:, :, :L]``, grouped-query heads without repeating K and V, no mask. It
is the reference row of every graph-mode benchmark (issue 14), where
transformers' ``StaticCache`` attends over its whole capacity with a mask and
repeats K and V per query head (not what a throughput-minded user runs).

**CUDA graphs.** The slice length ``L`` is a host integer (SDPA's shapes must
be static in a graph), taken from the host mirror of the token count when the
step runs (or is captured). A captured step therefore attends to the ``L`` of
its capture: capture one graph per decode step (what
:func:`mustafar.bench.graph_decode` does for caches with
``captures_length = True``, in one shared memory pool) and replay them in order.
The device-side ``length`` only places the writes. A one-token write is one Triton launch
per layer on CUDA (:mod:`mustafar.kernels.dense_write`, K and V and the length advance, as a
serving engine's cache-write kernel), so the baseline's bookkeeping is as lean as the sparse
cache's fused one.

Multi-token steps (the prefill, in one step or in chunks) are allowed until the
first one-token step; each chunk attends to every token before it
(:func:`mustafar.chunk_attention.chunk_attention`).

Example::

    >>> import torch, transformers, mustafar
    >>> cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar")
    >>> cache = mustafar.DenseStaticCache(cfg, batch_size=1, max_tokens=64)
    >>> ids = torch.randint(128, (1, 20))
    >>> logits = model(ids, past_key_values=cache, position_ids=torch.arange(20)[None]).logits
    >>> logits = model(logits[:, -1:].argmax(-1), past_key_values=cache, position_ids=torch.tensor([[20]])).logits
    >>> int(cache.layers[0].length), cache.get_seq_length(), tuple(cache.layers[0].keys.shape)
    (21, 21, (1, 2, 64, 16))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .._checks import CACHE_DTYPES, check_positive_int
from ..attention import Link, link_tensor
from ..chunk_attention import chunk_attention
from .fixed_length import FixedLengthCache, FixedLengthLayer
from .rules import pads_from_mask
from .static import config_layers

__all__ = ["DenseStaticCache", "DenseStaticLayer"]

#: ``backend`` values: "auto" (the Triton write on CUDA, torch ops elsewhere), "torch", "triton" (the Triton
#: write wherever Triton runs, the interpreter included).
_BACKENDS = ("auto", "torch", "triton")
#: Head dims the Triton write takes (one tile per row).
_MAX_HEAD_DIM = 256
_NO_EDITS = ("DenseStaticCache cannot crop or reorder batch rows: its buffers are allocated once for graph "
             "replays; use transformers' DynamicCache")


class DenseStaticLayer(FixedLengthLayer, CacheLayerMixin):
    """One layer: ``keys`` / ``values`` ``[batch, kv_heads, max_tokens, head_dim]``, allocated at the first update.

    Attributes:
        keys, values: the preallocated buffers (token ``t`` at index ``t``); ``None`` before the first update.
        length: int64 device scalar, tokens held (advanced on the device).
        host_length: its host mirror (advanced by eager steps and captures, not by graph replays).
    """

    crop_refusal = rows_refusal = _NO_EDITS

    is_compileable = False
    is_sliding = False
    is_croppable = False
    captures_length = True

    def __init__(self, max_tokens: int, layer_idx: int = 0, *, batch_size: int | None = None,
                 dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        self.max_tokens, self.layer_idx, self.backend = max_tokens, layer_idx, backend
        self.expected_batch, self.expected_dtype = batch_size, dtype
        self.length = self.counter = None
        self.host_length, self.decoding, self._unconsumed = 0, False, False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate ``keys``, ``values`` (``max_tokens``) and ``length`` like ``key_states``.

        Raises:
            ValueError: called while a CUDA graph is being captured (run the prefill eagerly first).
        """
        if key_states.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"DenseStaticCache layer {self.layer_idx} allocates its buffers at its first update: "
                             "run the prefill eagerly before capturing a decode step in a CUDA graph")
        batch, kv_heads, _, head_dim = key_states.shape
        self.keys = key_states.new_zeros(batch, kv_heads, self.max_tokens, head_dim)
        self.values = torch.zeros_like(self.keys)
        self.length = torch.zeros((), dtype=torch.int64, device=key_states.device)
        self.counter = torch.zeros((), dtype=torch.int32, device=key_states.device)  # of the Triton write
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``n`` new tokens in place at the device-side ``length``; return the tokens held (views).

        Raises:
            ValueError: states that are not ``[batch, kv_heads, n, head_dim]`` alike (or contradict
                ``batch_size`` / ``dtype`` / the buffers), more than ``max_tokens`` tokens, a multi-token
                step after a one-token step, or the previous output not read by the ``"mustafar"`` attention.
        """
        if self._unconsumed:
            raise ValueError(f"DenseStaticCache layer {self.layer_idx}: the previous update was not read by the "
                             "'mustafar' attention; load the model with attn_implementation=\"mustafar\"")
        self._check_states(key_states, value_states)
        n = key_states.shape[2]
        if self.host_length + n > self.max_tokens:
            raise ValueError(f"DenseStaticCache holds max_tokens={self.max_tokens}, got {self.host_length} + {n} "
                             "tokens")
        if n > 1 and self.decoding:
            raise ValueError("DenseStaticCache takes multi-token steps (the prefill, whole or chunked) only before "
                             "the first one-token decode step")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._write(key_states, value_states)
        first = self.host_length == 0
        self.host_length += n
        self.decoding = self.decoding or (n == 1 and not first)  # one token on an empty cache: a prefill
        held_k, held_v = self.keys[:, :, :self.host_length], self.values[:, :, :self.host_length]
        if first and n > 1:  # the whole prompt in one step: transformers' SDPA path, as for any cache
            held_k, held_v = key_states, value_states
        link_tensor(held_k, Link(self, dense=first and n > 1))
        self._unconsumed = True
        return held_k, held_v

    @property
    def fused(self) -> bool:
        """Whether a one-token write is one Triton launch (CUDA, or ``backend="triton"`` under the interpreter)."""
        from ..backends import triton_available

        asked = self.backend == "triton" or (self.backend != "torch" and self.device.type == "cuda")
        return self.is_initialized and asked and triton_available() and self.keys.shape[-1] <= _MAX_HEAD_DIM

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, advance: bool = True,
               state: tuple | None = None) -> None:
        """Write the new tokens at the device-side ``length`` and advance it (one launch where :attr:`fused`).

        ``state``: ``(keys, values, length, counter)`` to write into instead of the layer's own.
        """
        keys, values, length, counter = state or (self.keys, self.values, self.length, self.counter)
        n = key_states.shape[2]
        if n == 1 and self.fused:
            from ..launch.dense_write import dense_write

            dense_write(keys, values, key_states, value_states, length, counter, advance)
            return
        positions = length + torch.arange(n, device=self.device)
        keys.index_copy_(2, positions, key_states)
        values.index_copy_(2, positions, value_states)
        if advance:
            length += n

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(new, torch.Tensor) or new.dim() != 4:
                raise ValueError(f"{name} must be a 4-d tensor [batch, kv_heads, n, head_dim], got "
                                 f"{type(new).__name__} {tuple(getattr(new, 'shape', ()))}")
        if key_states.dtype not in CACHE_DTYPES:
            raise TypeError(f"key_states must have a dtype in {CACHE_DTYPES}, got {key_states.dtype}")
        if self.is_initialized:
            b, h, _, d = self.keys.shape
            shape, dtype = (b, h, d), self.dtype
        else:
            b, h, _, d = key_states.shape
            shape, dtype = (self.expected_batch or b, h, d), self.expected_dtype or key_states.dtype
        for name, new in (("key_states", key_states), ("value_states", value_states)):
            if (new.shape[0], new.shape[1], new.shape[3]) != shape or new.dtype != dtype \
                    or new.shape[2] != key_states.shape[2] or new.device != key_states.device:
                raise ValueError(f"{name} must be [{shape[0]}, {shape[1]}, n, {shape[2]}] {dtype} on one device, "
                                 f"got {tuple(new.shape)} {new.dtype} {new.device}")
        if self.is_initialized and key_states.device != self.device:
            raise ValueError(f"key_states must be on {self.device}, got {key_states.device}")

    def consume(self, module=None, attention_mask: torch.Tensor | None = None) -> None:
        """Mark the last update as read by the ``"mustafar"`` attention.

        Raises:
            ValueError: the first prefill's ``attention_mask`` pads a row (this cache reads no mask).
        """
        self._unconsumed = False
        tokens = self.host_length
        prefill = attention_mask is not None and tokens > 1 and attention_mask.shape[-2] == tokens
        if prefill and any(pads_from_mask(attention_mask, self.keys.shape[0], tokens)):
            raise ValueError("DenseStaticCache does not support padded batches (its attention reads no mask)")

    def attend(self, query, key, value, scale, attention_mask) -> torch.Tensor:
        """SDPA over exactly the tokens held (``key``/``value`` are the views :meth:`update` returned)."""
        if query.shape[2] > 1:
            return chunk_attention(query, key, value, scale)
        return F.scaled_dot_product_attention(query, key, value, scale=scale,
                                              enable_gqa=query.shape[1] != key.shape[1])

    def bookkeeping_probe(self):
        """A call doing this layer's per-step bookkeeping (the in-place K/V write) on scratch buffers.

        Its ``length`` stays 0 (not advanced), so every call writes the same slot; the work is a real step's
        (the device-side length advance aside).
        """
        b, h, _, d = self.keys.shape
        state = (self.keys.new_zeros(b, h, 1, d), self.keys.new_zeros(b, h, 1, d),
                 torch.zeros((), dtype=torch.int64, device=self.device), torch.zeros_like(self.counter))
        new = self.keys.new_ones(b, h, 1, d)
        return lambda: self._write(new, new, advance=False, state=state)


class DenseStaticCache(FixedLengthCache, Cache):
    """A preallocated dense KV cache with device-side writes and exact-length SDPA decode (see the module docstring).

    Args:
        config: the model's config, optional (``num_hidden_layers`` creates the layers up front).
        batch_size: optional; if given, the first keys' batch must equal it.
        max_tokens: prompt + generated tokens to hold (required).
        dtype: optional; if given, the keys must have it.
        backend: ``"auto"`` (a decode step's write is one Triton launch per layer on CUDA, torch ops
            elsewhere), ``"torch"`` or ``"triton"`` (the Triton write wherever Triton runs).

    Raises:
        TypeError / ValueError: a missing or bad ``max_tokens``, ``batch_size``, ``dtype`` or ``backend``.
    """

    crop_refusal = rows_refusal = _NO_EDITS

    is_compileable = False
    captures_length = True

    def __init__(self, config=None, batch_size: int | None = None, max_tokens: int | None = None,
                 dtype: torch.dtype | None = None, backend: str = "auto"):
        if max_tokens is None:
            raise TypeError("DenseStaticCache needs max_tokens: the prompt + generated tokens it must hold")
        if dtype is not None and dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be None or one of {CACHE_DTYPES}, got {dtype!r}")
        self.max_tokens = check_positive_int("max_tokens", max_tokens)
        batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self._expect = dict(batch_size=batch_size, dtype=dtype, backend=backend)
        super().__init__(layers=[self._new_layer(i) for i in range(config_layers(config))])

    def _new_layer(self, layer_idx: int) -> DenseStaticLayer:
        return DenseStaticLayer(self.max_tokens, layer_idx, **self._expect)

    def __repr__(self) -> str:
        return f"DenseStaticCache(max_tokens={self.max_tokens}, layers={len(self.layers)})"

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the K and V buffers, all layers (0 before the first update)."""
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers
                   if layer.is_initialized)
