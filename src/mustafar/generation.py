"""Generation helpers shared by the evaluation, the benchmarks and the command line.

One of each: :func:`make_cache` (the cache of a setting and decode mode), :func:`cache_kwargs` (the
keyword that passes a cache to the model), :func:`prefill`, :func:`kv_bytes` (KV memory of any cache)
and :func:`parse_dtype`; plus greedy decoding through a cache for the evaluation.

Caches (:func:`make_cache`): in the eager ``"generate"`` mode ``dense`` is transformers'
``DynamicCache`` (the baseline) and any other setting a :class:`mustafar.MustafarCache`; in the
graph-captured ``"graph"`` mode, transformers' ``StaticCache`` and :class:`mustafar.StaticMustafarCache`.
Prefill attention is dense in Mustafar
(arXiv 2505.22913), so one prefill can serve every setting: :func:`prefill`
runs it once into a ``DynamicCache`` and :func:`fill_cache` hands its keys and
values to each setting's cache through the public ``Cache.update`` (pruning and
compressing them exactly as a prefill through that cache would); decode steps
(:func:`forward`, :func:`greedy_decode`) then read the compressed cache.

Example::

    >>> import mustafar
    >>> from mustafar.generation import chat_input_ids, prefill, make_cache, fill_cache, greedy_decode
    >>> model, tok = mustafar.load_model()
    >>> ids = chat_input_ids(tok, "Name a colour.")
    >>> source, logits = prefill(model, ids)
    >>> cache = fill_cache(make_cache(mustafar.parse_setting("K0.5V0.5")), source)
    >>> tok.decode(greedy_decode(model, cache, logits, max_new_tokens=8, eos_token_ids={tok.eos_token_id}))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache

from .cache import MustafarCache, StaticMustafarCache
from .config import SparsityConfig

__all__ = ["MODES", "DTYPES", "KVBytes", "make_cache", "kv_bytes", "cache_kwargs", "parse_dtype", "chat_input_ids",
           "prefill", "fill_cache", "forward", "greedy_decode", "eos_ids"]

#: Decode modes: eager ``model.generate()`` / a loop of one-token forwards, or a graph-captured loop on static caches.
MODES = ("generate", "graph")
#: Model and cache dtypes by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_cache(config: SparsityConfig, mode: str = "generate", *, model=None, batch: int | None = None,
               max_tokens: int | None = None, backend: str = "auto") -> Cache:
    """A fresh cache for the setting ``config`` and the decode ``mode`` (:data:`MODES`).

    ``"generate"``: ``DynamicCache`` when dense, else ``MustafarCache.from_config(config, backend=backend)``.
    ``"graph"``: ``StaticCache`` when dense, else a :class:`~mustafar.StaticMustafarCache` (window from the
    setting, at least 1; chunk does not apply); both need ``model`` (its config, dtype and device),
    ``batch`` and ``max_tokens`` (prompt + generated tokens, preallocated).

    Raises:
        TypeError: ``config`` not a :class:`~mustafar.SparsityConfig`.
        ValueError: an unknown ``mode``; ``"graph"`` without ``model``, ``batch`` or ``max_tokens``.
    """
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a mustafar.SparsityConfig, got {type(config).__name__}")
    if mode == "generate":
        return DynamicCache() if config.is_dense else MustafarCache.from_config(config, backend=backend)
    if mode != "graph":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if model is None or batch is None or max_tokens is None:
        raise ValueError(f"mode 'graph' needs model, batch and max_tokens, got model={type(model).__name__}, "
                         f"batch={batch!r}, max_tokens={max_tokens!r}")
    if config.is_dense:
        return StaticCache(config=model.config, max_cache_len=max_tokens)
    return StaticMustafarCache(model.config, batch_size=batch, max_tokens=max_tokens,
                               key_sparsity=config.key_sparsity, value_sparsity=config.value_sparsity,
                               window=max(1, config.window), dtype=model.dtype, device=model.device, backend=backend,
                               kept_dtype=config.kept_dtype)


@dataclass(frozen=True)
class KVBytes:
    """KV memory of a cache, all layers, in bytes.

    Attributes:
        held: bytes of the tokens held (for the Mustafar caches: compressed values + bitmaps (+ FP8 scales) + the
            dense window).
        dense: bytes a dense cache of the same tokens and dtype would hold.
        allocated: bytes allocated, room not yet used included.
    """

    held: int
    dense: int
    allocated: int

    @property
    def ratio(self) -> float | None:
        """``held / dense`` (``None`` for an empty cache)."""
        return self.held / self.dense if self.dense else None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def kv_bytes(cache) -> KVBytes:
    """KV memory of ``cache`` (:class:`KVBytes`): the one count used by the evaluation, the benchmarks and the CLI.

    - :class:`~mustafar.StaticMustafarCache`: it holds its whole allocation (``max_tokens``), and its token
      count on the host is not advanced by graph replays, so ``held`` = ``allocated`` and ``dense`` is
      ``max_tokens`` dense tokens.
    - caches with ``nbytes`` and ``dense_nbytes`` (:class:`~mustafar.MustafarCache`, the evaluation's
      simulated caches): those (``allocated``: ``allocated_nbytes`` where the cache has it, else ``held``).
    - transformers' caches (``DynamicCache``, ``StaticCache``): the bytes of their key and value tensors
      (for ``StaticCache`` the buffers of ``max_cache_len`` tokens), dense by definition.

    Raises:
        TypeError: ``cache`` is none of these.
    """
    if isinstance(cache, StaticMustafarCache):
        allocated = cache.allocated_nbytes
        dense = sum(2 * cache.max_tokens * _tensor_bytes(layer.keys[:, :, 0]) for layer in cache.layers)
        return KVBytes(allocated, dense, allocated)
    if hasattr(cache, "nbytes") and hasattr(cache, "dense_nbytes"):
        return KVBytes(cache.nbytes, cache.dense_nbytes, getattr(cache, "allocated_nbytes", cache.nbytes))
    if isinstance(cache, Cache):
        held = sum(_tensor_bytes(t) for layer in cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
        return KVBytes(held, held, held)
    raise TypeError(f"cache must be a transformers Cache or a mustafar cache, got {type(cache).__name__}")


def cache_kwargs(model, cache: Cache) -> dict:
    """The keyword that passes ``cache`` to ``model(...)`` and ``model.generate(...)``.

    ``{"cache": cache}`` where the model's forward takes ``cache`` (transformers 5.24,
    which deprecates ``past_key_values``), else ``{"past_key_values": cache}`` (5.17).
    """
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


def parse_dtype(dtype: torch.dtype | str, allow_auto: bool = False) -> torch.dtype | str:
    """``torch.float16`` / ``"float16"`` (or bfloat16, float32) -> the torch dtype; ``"auto"`` kept if allowed.

    Raises:
        ValueError: another dtype or name (``"auto"`` without ``allow_auto``).
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if allow_auto and dtype == "auto":
        return dtype
    names = ", ".join((["'auto'"] if allow_auto else []) + list(DTYPES))
    raise ValueError(f"dtype must be a torch.dtype or one of {names}, got {dtype!r}")


def chat_input_ids(tokenizer, prompt: str, answer_prefix: str = "") -> torch.Tensor:
    """Token ids ``[1, n]`` (int64) of ``prompt`` as the user turn of the chat template, then ``answer_prefix``.

    ``answer_prefix`` starts the assistant's reply (e.g. ``"The pass key is"``);
    models without a chat template get the prompt as plain text.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt + "\n"
    return tokenizer(text + answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: the generation config's ``eos_token_id`` (int or list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run ``input_ids [1, n]`` through ``model`` after the tokens in ``cache``; return logits ``[1, n, vocab]`` fp32."""
    out = model(input_ids=input_ids.to(model.device), use_cache=True, **cache_kwargs(model, cache))
    return out.logits.float()


def prefill(model, input_ids: torch.Tensor, cache: Cache | None = None) -> tuple[Cache, torch.Tensor]:
    """Prefill ``input_ids [batch, n]`` into ``cache`` (default: a new ``DynamicCache``, a dense prefill).

    Returns ``(cache, next-token logits [batch, vocab] fp32)``; only the last position's logits are
    computed where the model supports it (``logits_to_keep=1``, as ``model.generate`` does).

    Raises:
        ValueError: ``input_ids`` not a ``[batch, n]`` tensor with ``n >= 1``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a [batch, n] tensor with n >= 1, got {getattr(input_ids, 'shape', input_ids)}")
    cache = DynamicCache() if cache is None else cache
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():  # not inference_mode: a static cache made here is updated in place after it
        out = model(input_ids=input_ids.to(model.device), use_cache=True, **keep, **cache_kwargs(model, cache))
    return cache, out.logits[:, -1].float()


def fill_cache(cache: Cache, source: DynamicCache) -> Cache:
    """Feed the keys and values of ``source`` (a prefilled ``DynamicCache``) into ``cache``; return ``cache``.

    Goes through ``cache.update(keys, values, layer_idx)``, the call a prefill makes;
    a ``MustafarCache`` layer prunes and compresses them as in a prefill, and is
    then marked consumed (its prefill attention is dense, already computed in ``source``).
    """
    if not isinstance(source, DynamicCache) or not source.layers:
        raise ValueError(f"source must be a prefilled DynamicCache, got {source!r:.80}")
    if cache.get_seq_length() != 0:
        raise ValueError(f"cache must be empty, got one holding {cache.get_seq_length()} tokens")
    for layer_idx, layer in enumerate(source.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), layer_idx)
        if isinstance(cache, MustafarCache):
            cache.layers[layer_idx].consume()
    return cache


def greedy_decode(
    model,
    cache: Cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] = frozenset(),
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy tokens after a prefill whose next-token ``logits [1, vocab]`` are given; each step reads ``cache``.

    Stops after ``max_new_tokens``, at a token in ``eos_token_ids`` (not returned),
    or when ``stop(tokens_so_far)`` is true.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits[0].argmax())
        if token in eos_token_ids:
            break
        tokens.append(token)
        if (stop is not None and stop(tokens)) or step == max_new_tokens - 1:
            break
        logits = forward(model, torch.tensor([[token]]), cache)[:, -1]
    return tokens
