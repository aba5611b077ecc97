"""Caches for a setting, KV memory accounting, and greedy decoding through the cache.

The evaluation and the command line build every cache here (:func:`make_cache`):
``dense`` is transformers' ``DynamicCache`` (the baseline), any other setting a
:class:`mustafar.MustafarCache`. Prefill attention is dense in Mustafar
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

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from .cache import MustafarCache
from .config import SparsityConfig

__all__ = ["make_cache", "kv_nbytes", "cache_kwargs", "chat_input_ids", "prefill", "fill_cache", "forward",
           "greedy_decode", "eos_ids"]


def make_cache(config: SparsityConfig) -> Cache:
    """A fresh cache for ``config``: ``DynamicCache`` when dense, else ``MustafarCache.from_config(config)``."""
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a mustafar.SparsityConfig, got {type(config).__name__}")
    return DynamicCache() if config.is_dense else MustafarCache.from_config(config)


def kv_nbytes(cache: Cache) -> tuple[int, int]:
    """``(held, dense)`` KV bytes of all layers: bytes the cache holds, and what a dense cache would hold.

    For a ``MustafarCache``: compressed values + bitmaps + dense window vs all
    tokens dense; for a ``DynamicCache`` both are the bytes of its key and value tensors.
    """
    if isinstance(cache, MustafarCache):
        return cache.nbytes, cache.dense_nbytes
    if isinstance(cache, DynamicCache):
        held = sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
        return held, held
    raise TypeError(f"cache must be a MustafarCache or a DynamicCache, got {type(cache).__name__}")


def cache_kwargs(model, cache: Cache) -> dict:
    """The keyword that passes ``cache`` to ``model(...)`` and ``model.generate(...)``.

    ``{"cache": cache}`` where the model's forward takes ``cache`` (transformers 5.24,
    which deprecates ``past_key_values``), else ``{"past_key_values": cache}`` (5.17).
    """
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


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


def prefill(model, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Dense prefill of ``input_ids [1, n]``: ``(DynamicCache of the n tokens, next-token logits [1, vocab] fp32)``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a [batch, n] tensor with n >= 1, got {getattr(input_ids, 'shape', input_ids)}")
    cache = DynamicCache()
    logits = forward(model, input_ids, cache)
    return cache, logits[:, -1]


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
