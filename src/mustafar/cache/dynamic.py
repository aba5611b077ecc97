"""``MustafarCache``: a transformers ``Cache`` with a dense local window and a bitmap-compressed store.

Source: Mustafar (Joo et al., arXiv 2505.22913) prunes every Key (after RoPE)
and Value vector per token by magnitude and keeps the most recent tokens dense
(the local window, the paper's residual length). Each layer
(:class:`~mustafar.cache.layer.MustafarLayer`) holds, in token order, a
**compressed store** (the oldest tokens, pruned once when they enter it) and the
**local window** (dense, ``[batch, kv_heads, w, head_dim]``).

The rule (:mod:`mustafar.cache.rules`): the prefill is attended dense; after it,
each row's oldest ``pads + k * chunk`` tokens are attended pruned, for the
largest ``k`` that leaves at least ``window`` real tokens dense. Without padding
the store grows by whole chunks and the window keeps ``window`` to
``window + chunk - 1`` tokens (fewer while the sequence is shorter); no token is
ever dropped or reordered. Left-padded rows are pruned exactly as each prompt
alone. A first update of any length is the prefill. In a step of several tokens each
query sees the cache as token-by-token decoding would (issue 17), so greedy assisted
and prompt-lookup decoding return plain greedy's tokens (up to floating-point
rounding, as with ``DynamicCache``). Every ``generate()`` mode of transformers works:
greedy, sampling, beam search (``reorder_cache``), assisted and prompt-lookup decoding
(``crop``, exact under ``activate_past_recording``, which generate calls), and
continuing with a returned cache. ``crop`` raises ``ValueError`` where it would need pruned
entries back; offloading raises ``NotImplementedError``; a second model or a
cross-attention reading the cache raises ``ValueError``.

Attention must run through the ``"mustafar"`` implementation (registered on
``import mustafar``, see :mod:`mustafar.attention`); a step that another one would
read raises ``ValueError`` at its update, before the cache changes (a prefill read by
another one: at the next step, and the cache must be reset). Which models are served:
:mod:`mustafar.model_support` (pass ``config=model.config`` to check at construction).

Example::

    >>> import torch, transformers, mustafar
    >>> cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar")
    >>> cache = mustafar.MustafarCache(0.5, 0.5, window=8, chunk=16, config=model.config)
    >>> _ = model.generate(torch.randint(128, (1, 40)), past_key_values=cache, max_new_tokens=10, do_sample=False)
    >>> cache.get_seq_length(), cache.layers[0].stored_tokens, round(cache.nbytes / cache.dense_nbytes, 3)
    (49, 32, 0.755)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache

from .. import ops
from .._checks import check_positive_int, check_sparsity
from ..config import FP8_KEPT, SparsityConfig
from ..fp8 import check_kept_dtype, is_fp8
from ..model_support import check_model_config
from .layer import NO_OFFLOADING, MustafarLayer
from .rows import check_batch_index

__all__ = ["LayerSparsity", "MustafarCache", "MustafarLayer"]

#: Per-layer sparsities: a sequence of ``(key_sparsity, value_sparsity)`` or ``layer_idx -> (ks, vs)``.
LayerSparsity = Sequence[tuple[float, float]] | Callable[[int], tuple[float, float]]


class MustafarCache(Cache):
    """A transformers ``Cache`` that prunes and compresses all but the most recent tokens (arXiv 2505.22913).

    Args:
        key_sparsity, value_sparsity: fraction of each Key / Value vector zeroed
            (per token and head, by magnitude), in [0, 1).
        window: tokens kept dense at the end of the sequence (the local window), >= 0.
        chunk: tokens moved from the window to the compressed store at once, >= 1.
        layer_sparsity: per-layer ``(key_sparsity, value_sparsity)``, a sequence
            indexed by layer or a callable ``layer_idx -> pair``; overrides the two above.
        backend: decode attention backend, ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        config: optional, the model's config (``model.config``): checked at once
            (:func:`mustafar.model_support.check_model_config`), and a ``layer_sparsity``
            sequence must then have one entry per layer.
        kept_dtype: ``None`` (the cache dtype, default) or ``torch.float8_e4m3fn``: the store keeps its
            values in e4m3 with one scale per token and head (``max kept |x| / 448``, rule:
            :mod:`mustafar.fp8`), about a fifth of fp16 dense at K0.7V0.7; the bitmaps are unchanged and
            the window stays dense. The CUDA kernels compress and decode FP8 stores (decode on compute
            capability >= 8.9; below it ``"auto"`` decodes with Triton).

    Storage lives on the device and in the dtype of each layer's keys. Sizes in
    bytes: :attr:`nbytes` (held), :attr:`dense_nbytes`, :attr:`allocated_nbytes`.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range, or a
            model the cache cannot serve.
        mustafar.ops.UnsupportedHardwareError: ``backend`` ``"triton"`` or ``"cuda"`` where it cannot
            run (:func:`mustafar.ops.available_backends`).
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
        config=None,
        kept_dtype: torch.dtype | None = None,
    ):
        if isinstance(key_sparsity, SparsityConfig):
            raise TypeError("key_sparsity must be a float; for a SparsityConfig use MustafarCache.from_config(config)")
        self.kept_dtype = check_kept_dtype(kept_dtype)
        self.config = SparsityConfig(key_sparsity, value_sparsity, window, chunk,
                                     kept_dtype=FP8_KEPT if is_fp8(self.kept_dtype) else None)
        self.backend = check_backend(backend)
        self.layer_sparsity = _check_layer_sparsity(layer_sparsity)
        if config is not None:
            layers = check_model_config(config)
            if isinstance(self.layer_sparsity, list) and len(self.layer_sparsity) != layers:
                raise ValueError(f"layer_sparsity must have one entry per layer of the model ({layers}), got "
                                 f"{len(self.layer_sparsity)}")
        self.record_past = False
        super().__init__(layers=[])

    @classmethod
    def from_config(cls, config: SparsityConfig, /, **kwargs) -> MustafarCache:
        """A cache for a :class:`~mustafar.config.SparsityConfig` (``method`` must be ``"per-token"``).

        ``kwargs`` go to the constructor (``backend``, ``layer_sparsity``, ``config=model.config``);
        ``config.kept_dtype`` gives ``kept_dtype``.
        """
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a mustafar.SparsityConfig, got {type(config).__name__}")
        if config.method != "per-token":
            raise ValueError(
                f"config.method must be 'per-token' (the only rule MustafarCache stores), got {config.method!r}"
            )
        return cls(config.key_sparsity, config.value_sparsity, config.window, config.chunk,
                   kept_dtype=config.kept_dtype, **kwargs)

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
        """Append new tokens to layer ``layer_idx`` (creating layers as needed); see :meth:`MustafarLayer.update`.

        Raises:
            TypeError / ValueError: ``layer_idx`` not an int >= 0; states that do not match each other or
                the cached ones (shape, dtype, device; see :meth:`MustafarLayer.update`).
            NotImplementedError: ``offloading`` was switched on.
        """
        if self.offloading:
            raise NotImplementedError(NO_OFFLOADING)
        layer_idx = check_layer_idx(layer_idx)
        while len(self.layers) <= layer_idx:
            ks, vs = self.sparsity_of(len(self.layers))
            c = self.config
            self.layers.append(MustafarLayer(ks, vs, c.window, c.chunk, self.backend, layer_idx=len(self.layers),
                                             record_past=self.record_past, kept_dtype=self.kept_dtype))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def activate_past_recording(self) -> None:
        """Keep each update's own tokens dense until the next one, so that ``crop`` can remove them exactly.

        transformers calls it before assisted decoding. What the attention reads does not change; the
        window holds the last update's tokens on top (a prefill stays dense until the next update).
        """
        self.record_past = True
        for layer in self.layers:
            layer.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every layer (a positive value: keep that many, 5.17).

        Raises:
            ValueError: in any layer the crop would need pruned entries back (nothing is removed then).
        """
        for layer in self.layers:
            if layer.is_initialized:
                layer.crop_check(tokens_to_remove)
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep (reorder, repeat) the batch rows ``beam_idx`` of every layer (beam search).

        ``beam_idx``: a 1-d integer tensor (or list) of rows in ``[0, batch)``, not empty; a bool mask is
        refused (use :meth:`batch_select_indices`). Checked once, before any layer changes.

        Raises:
            TypeError / ValueError: see :func:`mustafar.cache.rows.check_batch_index`.
        """
        self._select_rows("beam_idx", beam_idx, masks=False)

    def batch_select_indices(self, indices: torch.Tensor | list) -> None:
        """Keep only the batch rows ``indices`` (integer rows in ``[0, batch)`` or a bool mask of ``batch``).

        Raises:
            TypeError / ValueError: see :func:`mustafar.cache.rows.check_batch_index`.
        """
        self._select_rows("indices", indices, masks=True)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` (an int >= 1) times in place (``torch.repeat_interleave`` order).

        Raises:
            TypeError / ValueError: ``repeats`` not an int >= 1; called between an update and its attention.
        """
        repeats = check_positive_int("repeats", repeats)
        held = [layer for layer in self.layers if layer.is_initialized]
        if held:
            self._select_rows("repeats", torch.arange(held[0].keys.shape[0]).repeat_interleave(repeats), masks=False)

    def _select_rows(self, name: str, index: object, masks: bool) -> None:
        held = [layer for layer in self.layers if layer.is_initialized]
        if not held:
            return
        index = check_batch_index(name, index, held[0].keys.shape[0], masks=masks)
        for layer in held:  # every check before any layer changes
            layer.check_rows_editable()
        for layer in held:
            layer.select_rows(index)

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


def check_layer_idx(layer_idx: object) -> int:
    """``layer_idx`` as an int after checking it is a non-negative integer (not a bool or a float)."""
    if type(layer_idx) is int and layer_idx >= 0:  # the common case, first: this runs per layer and step
        return layer_idx
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral):
        raise TypeError(f"layer_idx must be an int >= 0 (the model layer), got {type(layer_idx).__name__} "
                        f"{layer_idx!r}")
    if layer_idx < 0:
        raise ValueError(f"layer_idx must be an int >= 0 (the model layer), got {layer_idx}")
    return int(layer_idx)


def check_backend(backend: object) -> str:
    """``backend`` after checking it is one of :data:`mustafar.ops.BACKENDS` and can run on this machine.

    Raises:
        ValueError: an unknown backend.
        mustafar.ops.UnsupportedHardwareError: ``"triton"`` or ``"cuda"`` not in
            :func:`mustafar.ops.available_backends`.
    """
    if not isinstance(backend, str) or backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if backend in ("triton", "cuda"):
        available = ops.available_backends()
        if backend not in available:
            needs = ("the triton package and a CUDA device (or TRITON_INTERPRET=1)" if backend == "triton"
                     else "a CUDA device of compute capability >= 8.0")
            raise ops.UnsupportedHardwareError(
                f"backend={backend!r} cannot run on this machine: it needs {needs}; available here: {available} "
                "(or 'auto', which picks the fastest of them)"
            )
    return backend


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
