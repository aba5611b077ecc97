"""Simulated pruning: any rule of :mod:`mustafar.pruning`, applied where MustafarCache would, stored dense.

Per-channel pruning and ThinK keep a different number of entries per token, so
the bitmap format cannot store them; output-aware pruning needs queries that
:class:`~mustafar.MustafarCache` does not see. To compare them fairly with the
per-token rule (Mustafar, arXiv 2505.22913), :class:`SimulatedCache` uses the
window / chunk policy of ``MustafarCache``: after every update, while the dense
tail holds ``window + chunk`` tokens or more, its oldest ``chunk`` tokens are
pruned once with the rule (the block moved at a prefill is the largest multiple
of ``chunk`` that leaves ``window`` tokens, pruned as one block) and kept, zeroed
in place, in a dense tensor. A prefill's own attention reads the unpruned
tokens (prefill attention is dense in Mustafar). **It saves no memory**: its
:attr:`~SimulatedCache.nbytes` are the dense bytes.

Rules per side (``method``): keys use the rule itself (:func:`mustafar.get_rule`).
Values use per-token magnitude for ``per-token`` and ``output-aware`` (an
output-aware value score, attention weight times ``|v|``, scales a whole token
and ranks its channels as ``|v|`` does), per-channel magnitude for
``per-channel``, and :class:`ValueChannelNorm` (ThinK-style structured channel
pruning scored by ``||V[:, c]||``, since queries do not multiply values) for ``think``.

Queries for ``output-aware`` and ``think`` (ThinK, Xu et al., arXiv 2407.21018,
scores channels with the queries of an observation window): the last ``window``
prompt tokens' queries of every layer, recorded during the prefill by
:func:`observe_queries`, which runs the model with the ``"mustafar-observe"``
attention (the ``"mustafar"`` attention plus a copy of each layer's post-RoPE
queries ``[batch, q_heads, window, head_dim]``). The same queries score every
later block of the sequence.

Example::

    >>> with observe_queries(model, window=32) as queries:
    ...     source, logits = prefill(model, ids)
    >>> cache = fill_cache(SimulatedCache(SparsityConfig(0.5, 0, method="think"), queries), source)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import mustafar_attention_forward
from ..config import SparsityConfig
from ..pruning import PerChannel, PerToken, PruningRule, get_rule

__all__ = ["SimulatedCache", "SimulatedLayer", "ValueChannelNorm", "value_rule", "observe_queries", "OBSERVE_NAME"]

#: Attention implementation that records the prefill's last queries (see :func:`observe_queries`).
OBSERVE_NAME = "mustafar-observe"
_OBSERVERS: list[tuple[int, dict[int, torch.Tensor]]] = []


class ValueChannelNorm(PruningRule):
    """ThinK-style structured pruning of values: keep the channels of largest ``||V[:, c]||`` over the tokens."""

    name, storable, axis = "value-channel-norm", False, -1

    def score(self, x, queries):
        return x.float().norm(dim=2, keepdim=True)


_VALUE_RULES = {"per-token": PerToken(), "output-aware": PerToken(), "per-channel": PerChannel(),
                "think": ValueChannelNorm()}


def value_rule(method: str) -> PruningRule:
    """The rule applied to values under ``method`` (see the module docstring)."""
    get_rule(method)
    return _VALUE_RULES[method]


class SimulatedLayer(DynamicLayer):
    """One layer of :class:`SimulatedCache`: all tokens dense, those before ``pruned_tokens`` pruned.

    ``queries``: ``[batch, q_heads, q_len, head_dim]`` for rules that need them, else ``None``.
    ``pads``: left-padding tokens per batch row (default none); a padded row is pruned as its
    prompt alone: blocks counted from its first real token, padding never pruned nor scored.
    """

    def __init__(self, config: SparsityConfig, queries: torch.Tensor | None = None, layer_idx: int = 0,
                 pads: list[int] | None = None):
        super().__init__()
        self.config, self.queries, self.layer_idx = config, queries, layer_idx
        self.key_rule, self.value_rule = get_rule(config.method), value_rule(config.method)
        self.pruned_tokens = 0
        self.pads = list(pads) if pads else []
        self.row_pruned = [0] * len(self.pads)  # real tokens pruned per row (padded batches)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, n, head_dim]`` states; prune blocks leaving the window; return K, V to attend.

        Returns the unpruned tokens for a prefill into an empty store (``n > 1``), else the held (pruned) tokens.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        was_empty = self.pruned_tokens == 0
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys, values
        if any(self.pads):
            self._prune_padded_rows()
            return (keys, values) if was_empty and key_states.shape[-2] > 1 else (self.keys, self.values)
        tail = keys.shape[-2] - self.pruned_tokens
        moved = max(0, (tail - self.config.window) // self.config.chunk) * self.config.chunk
        if moved:
            self._prune(self.pruned_tokens, self.pruned_tokens + moved)
        return (keys, values) if was_empty and key_states.shape[-2] > 1 else (self.keys, self.values)

    def _prune(self, start: int, stop: int) -> None:
        for side, rule, sparsity in (("keys", self.key_rule, self.config.key_sparsity),
                                     ("values", self.value_rule, self.config.value_sparsity)):
            if sparsity == 0:
                continue
            held = getattr(self, side)
            block = rule.prune(held[:, :, start:stop], sparsity, self.queries if rule.needs_queries else None)
            setattr(self, side, torch.cat([held[:, :, :start], block, held[:, :, stop:]], dim=-2))
        self.pruned_tokens = stop

    def _prune_padded_rows(self) -> None:
        """Prune each row's real tokens as that row alone would; rows of equal padding pruned together."""
        total, window, chunk = self.keys.shape[-2], self.config.window, self.config.chunk
        groups: dict[tuple[int, int, int], list[int]] = {}
        for row, (pad, done) in enumerate(zip(self.pads, self.row_pruned)):
            moved = max(0, (total - pad - done - window) // chunk) * chunk
            if moved:
                groups.setdefault((pad + done, pad + done + moved, moved), []).append(row)
        if not groups:
            self.pruned_tokens = min(p + d for p, d in zip(self.pads, self.row_pruned))
            return
        self.keys, self.values = self.keys.clone(), self.values.clone()
        for (start, stop, moved), rows in groups.items():
            index = torch.tensor(rows, device=self.keys.device)
            for side, rule, sparsity in (("keys", self.key_rule, self.config.key_sparsity),
                                         ("values", self.value_rule, self.config.value_sparsity)):
                if sparsity == 0:
                    continue
                held = getattr(self, side)
                queries = self.queries.index_select(0, index) if rule.needs_queries else None
                held[index, :, start:stop] = rule.prune(held.index_select(0, index)[:, :, start:stop], sparsity,
                                                        queries)
            for row in rows:
                self.row_pruned[row] += moved
        self.pruned_tokens = min(p + d for p, d in zip(self.pads, self.row_pruned))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (pruned tokens that stay keep their pruning)."""
        super().crop(tokens_to_remove)
        self.pruned_tokens = min(self.pruned_tokens, self.get_seq_length())
        self.row_pruned = [max(0, min(d, self.get_seq_length() - p)) for p, d in zip(self.pads, self.row_pruned)]


class SimulatedCache(Cache):
    """A cache that prunes like :class:`~mustafar.MustafarCache` with any rule, stored dense (saves no memory).

    Args:
        config: sparsities, window, chunk and ``method`` (a name of :data:`mustafar.pruning.RULES`).
        queries: ``layer_idx -> [batch, q_heads, q_len, head_dim]`` observation queries, required
            when the method needs them (``output-aware``, ``think``); see :func:`observe_queries`.
        pads: left-padding tokens per batch row (a left-padded batch; see :class:`SimulatedLayer`).

    Raises:
        TypeError: ``config`` not a SparsityConfig. ValueError: queries missing for a layer that needs them.
    """

    def __init__(self, config: SparsityConfig, queries: dict[int, torch.Tensor] | None = None,
                 pads: list[int] | None = None):
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a mustafar.SparsityConfig, got {type(config).__name__}")
        self.config, self.queries, self.pads = config, queries or {}, pads
        self.needs_queries = get_rule(config.method).needs_queries and config.key_sparsity > 0
        super().__init__(layers=[])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append to layer ``layer_idx`` (creating layers as needed); see :meth:`SimulatedLayer.update`."""
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            if self.needs_queries and index not in self.queries:
                raise ValueError(f"queries must hold the observation queries of layer {index} for method "
                                 f"{self.config.method!r} (see observe_queries), got layers {sorted(self.queries)}")
            self.layers.append(SimulatedLayer(self.config, self.queries.get(index), layer_idx=index,
                                              pads=self.pads))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """KV bytes held, all layers: every token dense (pruned entries are stored as zeros)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    dense_nbytes = nbytes


def _observe_forward(module, query, key, value, attention_mask, **kwargs):
    """The ``"mustafar"`` attention; during :func:`observe_queries`, also keeps a prefill's last queries."""
    if _OBSERVERS and query.shape[2] > 1:
        window, store = _OBSERVERS[-1]
        store[module.layer_idx] = query[:, :, -window:].detach().clone()
    return mustafar_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(OBSERVE_NAME, _observe_forward)
AttentionMaskInterface.register(OBSERVE_NAME, sdpa_mask)


@contextmanager
def observe_queries(model, window: int) -> Iterator[dict[int, torch.Tensor]]:
    """Record the last ``window`` queries of every layer of each multi-token forward run inside the block.

    Yields ``{layer_idx: [batch, q_heads, min(window, q_len), head_dim]}`` (post-RoPE, a
    copy), filled as the model runs. The model runs with the ``"mustafar-observe"``
    attention inside the block (the ``"mustafar"`` attention plus the recording) and
    gets its previous implementation back on exit.

    Raises:
        ValueError: ``window`` < 1.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (observation queries), got {window!r}")
    previous = model.config._attn_implementation  # transformers has no public getter (5.24)
    store: dict[int, torch.Tensor] = {}
    model.set_attn_implementation(OBSERVE_NAME)
    _OBSERVERS.append((window, store))
    try:
        yield store
    finally:
        _OBSERVERS.pop()
        model.set_attn_implementation(previous)
