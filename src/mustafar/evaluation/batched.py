"""Batched prefill and greedy decoding for the evaluation: left-padded prompts, one row per sample.

Prompts of one task and context length are grouped by length (:func:`length_batches`),
left-padded to the longest (:func:`left_pad`) and prefilled once, densely, into a
``DynamicCache`` (:func:`batched_prefill`: only the last position's logits are computed).
Each (method, setting) cache is then filled from it (:func:`fill_batch`) and every row is
decoded greedily (:func:`batched_greedy`) until its own end-of-sequence token, stop rule or
token budget; rows that are done are fed their last token until the whole batch is done
(their outputs are no longer read). Rows never see each other: attention is per row, a
:class:`~mustafar.MustafarCache` reads each row's left padding from the prefill mask and
prunes it as that prompt alone (see :mod:`mustafar.cache_layer`), and
:class:`~.simulate.SimulatedCache` takes the padding per row. So batch size N gives each
sample what batch size 1 gives it (the tests compare the per-sample outputs).

Without padding (batch size 1, or prompts of equal length) no attention mask and no
position ids are passed: the model's default causal path runs, as before batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from .._checks import check_positive_int
from ..cache import MustafarCache
from ..cache.rules import boundaries
from ..format import bytes_per_token, dense_bytes_per_token
from ..generation import cache_kwargs
from .simulate import observe_queries

__all__ = ["PaddedBatch", "left_pad", "length_batches", "batched_prefill", "fill_batch", "batched_greedy",
           "auto_batch_size", "alone_nbytes", "MAX_AUTO_BATCH", "PREFILL_ROWS"]

#: Most rows :func:`auto_batch_size` proposes (decode steps are Python-bound for small models: rows are cheap).
MAX_AUTO_BATCH = 128
#: Rows per prefill forward (bounds the prefill's activations and attention mask; 8 x 8k tokens saturate a GPU).
PREFILL_ROWS = 8
#: Fraction of the free device memory :func:`auto_batch_size` plans to use.
_MEMORY_FRACTION = 0.6
#: Copies of a token's K and V alive at once per row: the prefill's source, the filled cache, a concatenation.
_KV_COPIES = 4
#: Activation tensors of ``intermediate_size`` per token alive at once in a prefill MLP (gate, up, product).
_MLP_COPIES = 3


class PaddedBatch:
    """Left-padded prompts: ``input_ids [batch, n]`` int64, ``pads`` (padding tokens per row).

    ``attention_mask`` ``[batch, n]`` int64 (1 = real token) and ``position_ids`` ``[batch, n]``
    (0 at each row's first real token) are ``None`` when no row is padded.
    """

    def __init__(self, input_ids: torch.Tensor, pads: list[int]):
        self.input_ids, self.pads = input_ids, pads
        self.padded = any(pads)
        n = input_ids.shape[1]
        if self.padded:
            positions = torch.arange(n).expand(len(pads), n) - torch.tensor(pads).unsqueeze(1)
            self.attention_mask = (positions >= 0).long()
            self.position_ids = positions.clamp(min=0)
        else:
            self.attention_mask = self.position_ids = None

    @property
    def rows(self) -> int:
        return len(self.pads)


def left_pad(prompts: Sequence[torch.Tensor], pad_token_id: int) -> PaddedBatch:
    """Stack ``prompts`` (each ``[1, n_i]`` int64) left-padded with ``pad_token_id`` into a :class:`PaddedBatch`.

    Raises:
        ValueError: no prompt, or a prompt that is not a non-empty ``[1, n]`` tensor.
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    for ids in prompts:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"prompts must be [1, n] tensors with n >= 1, got {getattr(ids, 'shape', ids)}")
    longest = max(ids.shape[1] for ids in prompts)
    pads = [longest - ids.shape[1] for ids in prompts]
    rows = [torch.cat([torch.full((1, p), pad_token_id, dtype=ids.dtype), ids], dim=1) for ids, p in zip(prompts, pads)]
    return PaddedBatch(torch.cat(rows), pads)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped by length (shortest first): the fewest groups of at most ``batch_size``.

    The groups are balanced (sizes differ by at most one): 275 prompts at 128 make 92, 92, 91.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = -(-len(order) // batch_size)
    sizes = [len(order) // groups + (g < len(order) % groups) for g in range(groups)]
    bounds = [sum(sizes[:g]) for g in range(groups + 1)]
    return [order[bounds[g]:bounds[g + 1]] for g in range(groups)]


def _forward(model, input_ids, cache: Cache, attention_mask, position_ids) -> torch.Tensor:
    """Last-position logits ``[batch, vocab]`` fp32 of ``input_ids`` after the tokens in ``cache``."""
    extra = {} if attention_mask is None else {"attention_mask": attention_mask.to(model.device),
                                               "position_ids": position_ids.to(model.device)}
    out = model(input_ids=input_ids.to(model.device), use_cache=True, logits_to_keep=1, **extra,
                **cache_kwargs(model, cache))
    return out.logits[:, -1].float()


@torch.inference_mode()
def batched_prefill(model, batch: PaddedBatch, observe_window: int | None = None,
                    rows_per_forward: int = PREFILL_ROWS) -> tuple[DynamicCache, torch.Tensor, dict]:
    """Dense prefill of ``batch``, ``rows_per_forward`` rows per forward (bounds the activations' memory).

    Returns ``(DynamicCache of all rows' tokens, next-token logits [batch, vocab] fp32, queries)``;
    ``queries``: with ``observe_window``, each layer's last ``observe_window`` post-RoPE queries
    ``[batch, q_heads, window, head_dim]`` (:func:`~.simulate.observe_queries`), else ``{}``.
    """
    check_positive_int("rows_per_forward", rows_per_forward)
    parts, logits, observed = [], [], []
    for start in range(0, batch.rows, rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        part = DynamicCache()
        mask, positions = ((None, None) if batch.attention_mask is None
                           else (batch.attention_mask[rows], batch.position_ids[rows]))
        with observe_queries(model, observe_window) if observe_window else nullcontext({}) as queries:
            logits.append(_forward(model, batch.input_ids[rows], part, mask, positions))
        parts.append(part)
        observed.append(queries)
    if len(parts) == 1:
        return parts[0], logits[0], observed[0]
    source = DynamicCache()
    for layer_idx in range(len(parts[0].layers)):
        source.update(torch.cat([p.layers[layer_idx].keys for p in parts]),
                      torch.cat([p.layers[layer_idx].values for p in parts]), layer_idx)
    queries = {layer: torch.cat([q[layer] for q in observed]) for layer in observed[0]}
    return source, torch.cat(logits), queries


def fill_batch(cache: Cache, source: DynamicCache, batch: PaddedBatch) -> Cache:
    """Feed ``source``'s keys and values into the empty ``cache`` (each row's padding told); return ``cache``.

    A ``MustafarCache`` layer learns each row's left padding from a mask as its prefill
    would (a view of the padding as the mask's diagonal, nothing allocated), then prunes
    and compresses; other caches go through ``Cache.update`` (a ``SimulatedCache`` is
    built with the batch's ``pads``).

    Raises:
        ValueError: ``source`` not a prefilled ``DynamicCache``, or ``cache`` not empty.
    """
    if not isinstance(source, DynamicCache) or not source.layers:
        raise ValueError(f"source must be a prefilled DynamicCache, got {source!r:.80}")
    if cache.get_seq_length() != 0:
        raise ValueError(f"cache must be empty, got one holding {cache.get_seq_length()} tokens")
    masks: dict[torch.device, torch.Tensor] = {}  # moved before the expand: a view, never n x n bytes
    for layer_idx, layer in enumerate(source.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), layer_idx)
        if isinstance(cache, MustafarCache):
            mask = None
            if batch.attention_mask is not None:
                device, n = layer.keys.device, batch.attention_mask.shape[1]
                if device not in masks:
                    masks[device] = batch.attention_mask.to(device).bool()[:, None, :, None].expand(
                        batch.rows, 1, n, n)
                mask = masks[device]
            cache.layers[layer_idx].consume(attention_mask=mask)
    return cache


@torch.inference_mode()
def batched_greedy(model, cache: Cache, logits: torch.Tensor, batch: PaddedBatch, max_new_tokens: Sequence[int],
                   eos_token_ids: set[int] = frozenset(),
                   stops: Sequence[Callable[[list[int]], bool] | None] | None = None,
                   on_done: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy tokens per row after a prefill whose next-token ``logits [batch, vocab]`` are given.

    Row ``r`` stops after ``max_new_tokens[r]`` tokens, at a token in ``eos_token_ids`` (not
    returned) or when ``stops[r](tokens_so_far)`` is true: the rule of
    :func:`mustafar.generation.greedy_decode`, per row. ``on_done(r, fed)`` is called when row
    ``r`` stops, with the tokens fed to the cache so far (what the cache holds beyond the prompt,
    as it would for that prompt alone), before any further step.

    Raises:
        ValueError: ``max_new_tokens`` (or ``stops``) not one entry per row, or an entry < 1.
    """
    rows = batch.rows
    stops = list(stops) if stops is not None else [None] * rows
    if len(max_new_tokens) != rows or len(stops) != rows:
        raise ValueError(f"max_new_tokens and stops must hold one entry per row ({rows}), got "
                         f"{len(max_new_tokens)} and {len(stops)}")
    if min(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1 per row, got {list(max_new_tokens)}")
    tokens: list[list[int]] = [[] for _ in range(rows)]
    active = [True] * rows
    mask, positions = batch.attention_mask, batch.position_ids
    for step in range(max(max_new_tokens)):
        chosen = logits.argmax(dim=-1).tolist()
        for r in range(rows):
            if not active[r]:
                continue
            if chosen[r] not in eos_token_ids:
                tokens[r].append(chosen[r])
            if chosen[r] in eos_token_ids or (stops[r] is not None and stops[r](tokens[r])) \
                    or len(tokens[r]) == max_new_tokens[r]:
                active[r] = False
                if on_done is not None:
                    on_done(r, step)
        if not any(active):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            positions = positions[:, -1:] + 1
        logits = _forward(model, torch.tensor(chosen).unsqueeze(1), cache, mask, positions)
    return tokens


def auto_batch_size(model, tokens: int, free_bytes: int | None = None) -> int:
    """Rows per batch that fill about 60 % of the free memory of ``model``'s CUDA device; 1 on other devices.

    Per row and token: ``_KV_COPIES`` copies of all layers' K and V, plus the prefill MLP's
    activations; at most :data:`MAX_AUTO_BATCH`. ``free_bytes``: plan for a device with this
    much free memory instead (any device; e.g. to plan a GPU run on a CPU machine).
    """
    device = model.device
    if device.type != "cuda" and free_bytes is None:
        return 1
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    size = model.dtype.itemsize
    per_token = (_KV_COPIES * 2 * cfg.num_hidden_layers * kv_heads * head_dim * size
                 + _MLP_COPIES * cfg.intermediate_size * size + cfg.hidden_size * size)
    free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    return max(1, min(MAX_AUTO_BATCH, int(_MEMORY_FRACTION * free // (per_token * max(1, tokens)))))


def alone_nbytes(cache: MustafarCache, tokens: int) -> int:
    """KV bytes one row of ``cache``'s layers would hold alone with ``tokens`` real tokens (no padding).

    Per layer: the rule's boundary at ``tokens`` (:func:`mustafar.cache.rules.boundaries`) in the
    compressed format (:func:`mustafar.format.bytes_per_token`, keys and values at their own
    sparsities, kept values in the layer's ``kept_dtype``), the rest dense (the window). That is what ``cache.nbytes`` gives for that prompt
    alone after the same tokens, since a lone row's store always reaches its boundary.
    """
    total = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        heads, head_dim, dtype = layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype
        stored = boundaries(tokens, [0], layer.window, layer.chunk)[0]
        compressed = sum(bytes_per_token(head_dim, s, dtype, layer.kept_dtype)
                         for s in (layer.key_sparsity, layer.value_sparsity))
        total += heads * (stored * compressed + (tokens - stored) * 2 * dense_bytes_per_token(head_dim, dtype))
    return total
