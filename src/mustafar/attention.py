"""The ``"mustafar"`` attention implementation for transformers (registered on ``import mustafar``).

Source: Mustafar (Joo et al., arXiv 2505.22913): prefill attention is dense;
decode attention reads the pruned, compressed cache directly.

transformers calls ``cache.update(key, value, layer_idx)`` in the attention
module, then the attention function with the tensors it returned. A
:class:`~mustafar.cache.MustafarLayer` links the key tensor it returns (by
identity) to itself; :func:`mustafar_attention_forward` looks its ``key``
argument up:

- not linked (e.g. a ``DynamicCache``): plain SDPA, exactly transformers' ``"sdpa"``;
- linked, prefill (the tensors hold every token, unpruned): the same SDPA;
- linked, decode (the tensors are the local window): ``layer.attend(...)``, i.e.
  :func:`mustafar.sparse_decode_attention` over the compressed store + window
  (or its static, graph-capturable form for :class:`~mustafar.StaticMustafarCache`).

A linked layer is first told who reads it: ``layer.consume(module, attention_mask)``
(it checks the reader and, at the prefill, reads the left padding from the mask).
Options whose semantics neither path implements (soft-capping, attention sinks,
and T5's position bias where transformers' SDPA ignores it) raise ``ValueError``.

The mask comes from transformers' SDPA mask function (registered for
``"mustafar"`` too): ``None`` or bool ``[batch, 1, q_len, kv_len]`` (True =
attend) over all tokens in order, compressed then window. A 4-d mask passed by
the user (bool or additive float) goes through as is.

Example::

    >>> import transformers, mustafar
    >>> "mustafar" in transformers.AttentionInterface()
    True
    >>> cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    >>> model.set_attn_implementation("mustafar")  # or load with attn_implementation="mustafar"
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ATTENTION_NAME", "Link", "held_mask", "link_tensor", "linked", "linked_count",
           "mustafar_attention_forward"]

#: Name of the attention implementation: ``attn_implementation="mustafar"``.
ATTENTION_NAME = "mustafar"
#: Attention kwargs the ``"mustafar"`` attention cannot honour over a Mustafar cache (it raises when one is set).
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")
#: The same, for plain SDPA over other caches: what this transformers' ``sdpa_attention_forward`` ignores silently.
_UNSUPPORTED_BY_SDPA = tuple(
    name for name in _UNSUPPORTED if name not in inspect.signature(sdpa_attention_forward).parameters
)


@dataclass(frozen=True)
class Link:
    """What the attention learns from a key tensor returned by ``MustafarLayer.update``.

    ``layer``: the cache layer. ``dense``: the returned tensors hold every token
    of the sequence unpruned (prefill); otherwise they are the local window and
    the older tokens are in ``layer.key_store`` / ``layer.value_store``.
    """

    layer: object
    dense: bool


#: id(tensor) -> (weak ref to the tensor, weak ref to the layer, dense). Weak both ways, so that a link never
#: keeps a cache alive (the layer holds the tensor), and the entry goes when the tensor is freed.
_LINKS: dict[int, tuple[weakref.ref, weakref.ref, bool]] = {}


def link_tensor(tensor: torch.Tensor, link: Link) -> None:
    """Link ``tensor`` (by identity) to ``link`` without keeping either alive.

    (A ``weakref.WeakKeyDictionary`` cannot hold tensors: its lookups compare keys
    with ``==``, which is elementwise for tensors.)
    """
    key = id(tensor)
    on_free = lambda _ref, links=_LINKS: links.pop(key, None)
    _LINKS[key] = (weakref.ref(tensor, on_free), weakref.ref(link.layer), link.dense)


def linked(tensor: torch.Tensor) -> Link | None:
    """The :class:`Link` of ``tensor`` if a live Mustafar cache layer returned it, else ``None``."""
    entry = _LINKS.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    layer = entry[1]()
    return None if layer is None else Link(layer, entry[2])


def linked_count() -> int:
    """Tensors linked to a cache layer now (a diagnostic: a cache keeps at most its last update's K and V linked)."""
    return len(_LINKS)


def held_mask(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The first ``tokens`` key columns of a 4-d mask (masks may be longer than the tokens held)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be None or a 4-d tensor [batch, 1, q_len, kv_len] for the 'mustafar' "
            f"attention, got {type(attention_mask).__name__} {getattr(attention_mask, 'shape', '')}"
        )
    if attention_mask.shape[-1] < tokens:
        raise ValueError(f"attention_mask must cover the {tokens} tokens held, got kv_len {attention_mask.shape[-1]}")
    return attention_mask[..., :tokens]


def mustafar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function of the ``"mustafar"`` implementation (transformers' ``AttentionInterface`` signature).

    Args:
        module: the attention module (reads ``scaling``, ``num_key_value_groups``).
        query: ``[batch, q_heads, q_len, head_dim]``.
        key, value: ``[batch, kv_heads, kv, head_dim]`` as returned by the cache's ``update``.
        attention_mask: ``None``, bool (True = attend) or additive float, ``[batch, 1, q_len, kv_len]``
            over every token held (``kv_len`` may exceed it: the extra columns are ignored). On the
            sparse decode path a fully masked query row gives zeros (see
            :func:`mustafar.sparse_decode_attention`); the dense prefill path is transformers' SDPA.
        scaling: softmax scale (default ``module.scaling``).

    Returns:
        ``([batch, q_len, q_heads, head_dim] in the query's dtype, None)``: no attention weights.

    Raises:
        ValueError: an unsupported option (softcap, attention sinks, position bias) over a
            Mustafar cache, or one that transformers' SDPA would ignore; on the sparse decode
            path, ``dropout > 0`` or a mask that does not cover the tokens held; a reader the
            cache layer refuses (see :func:`mustafar.model_support.check_reader`).
    """
    link = linked(key)
    unsupported = [name for name in (_UNSUPPORTED if link else _UNSUPPORTED_BY_SDPA) if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"the 'mustafar' attention supports none of {_UNSUPPORTED}, got {unsupported} "
                         f"from {type(module).__name__}")
    if link is not None:
        link.layer.consume(module, attention_mask)
        _warn_sliding(link.layer, kwargs.get("sliding_window"))
    if link is None or link.dense:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout:
        raise ValueError(f"the 'mustafar' decode attention supports dropout=0 only, got dropout={dropout}")
    scale = scaling if scaling is not None else getattr(module, "scaling", None)
    out = link.layer.attend(query, key, value, scale, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _warn_sliding(layer, sliding_window: int | None) -> None:
    """Warn (once per place) when a sliding-window layer's cache holds more tokens than its window."""
    if sliding_window is not None and layer.get_seq_length() > sliding_window:
        warnings.warn(
            f"a MustafarCache keeps every token of sliding-window layers (sliding_window={sliding_window}): the "
            "attention mask hides the old ones, so the output is right, but DynamicCache(config=model.config) "
            "would keep only the window of such layers",
            UserWarning,
            stacklevel=3,
        )


AttentionInterface.register(ATTENTION_NAME, mustafar_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
