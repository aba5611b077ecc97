"""Breakdown of one decode step into attention, bookkeeping (compression included) and the rest.

Method (all times in ms per decode step, whole model):

1. **Attention.** One extra eager decode step runs after the timed ones with a
   probe around the ``"mustafar"`` attention function (registered through
   transformers' public ``AttentionInterface`` and restored afterwards) that
   records the arguments of layer 0's call: the query, the keys and values the
   cache returned, the mask. That call is then repeated in isolation on those
   very tensors (the cache's own buffers) and timed with CUDA events
   (:meth:`Clock.op_ms`; captured in a CUDA graph when the step itself is, so that
   launch overhead counts alike), and multiplied by the layer count (all layers
   have the same shapes). For transformers' caches this is the SDPA call
   (including ``repeat_kv`` when a mask forces it); for Mustafar caches the
   sparse decode attention over the compressed store and the window.
2. **Compression.** The cache's compression op
   (:func:`mustafar.bench.caches.compress_op`: ``MustafarCache`` compresses
   ``chunk`` tokens every ``chunk`` steps, ``StaticMustafarCache`` one token per
   step), timed the same way, times the calls per step, times the layer count.
   Zero for dense caches.
3. **Bookkeeping.** All of a layer's per-step cache work besides attention
   (:func:`mustafar.bench.caches.bookkeeping_op`): for the static caches the
   in-place write of the new token (dense) or the fused evict + compress + ring
   write (sparse; one launch per layer), run on scratch buffers of the cache's
   shapes; for ``MustafarCache`` its compression (2.). Times the layer count.
4. **Rest** = measured step time - attention - bookkeeping: projections, MLP,
   norms, RoPE, sampling, and (eager) launch and Python overhead (and, for
   ``MustafarCache``, the update's concatenation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transformers import AttentionInterface

from ..attention import ATTENTION_NAME
from .caches import bookkeeping_op, compress_op
from .timing import Clock

__all__ = ["recorded_attention", "step_breakdown"]


@contextmanager
def recorded_attention(layer_idx: int = 0, name: str = ATTENTION_NAME) -> Iterator[list]:
    """Record ``(function, module, args, kwargs)`` of every call of attention ``name`` for ``layer_idx``.

    The registered function is wrapped (calls still go through) and restored on exit.
    """
    original = AttentionInterface()[name]
    calls: list = []

    def probe(module, *args, **kwargs):
        if getattr(module, "layer_idx", None) == layer_idx:
            calls.append((original, module, args, kwargs))
        return original(module, *args, **kwargs)

    AttentionInterface.register(name, probe)
    try:
        yield calls
    finally:
        AttentionInterface.register(name, original)


def step_breakdown(model, cache, setting, batch: int, step: Callable[[], object], step_ms: float, clock: Clock,
                   graph: bool = False, repeats: int = 20) -> dict:
    """``{attention_ms, compression_ms, bookkeeping_ms, rest_ms, layers, ...}`` for one decode step.

    ``step()`` runs one more eager decode step on ``cache`` (it may grow by one
    token); ``step_ms`` is the measured time of a decode step; ``graph``: time the
    ops as CUDA graph replays. See the module docstring for the method.
    """
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    with recorded_attention() as calls:
        step()
    if not calls:
        raise RuntimeError(f"the attention of layer 0 was not called through {ATTENTION_NAME!r}; "
                           f"the model uses {model.config._attn_implementation!r}")
    function, module, args, kwargs = calls[-1]
    attention_ms = clock.op_ms(lambda: function(module, *args, **kwargs), repeats, graph) * layers
    op = compress_op(cache, setting, batch, model)
    compression_ms = 0.0 if op is None else clock.op_ms(op.run, repeats, graph) * op.per_step * layers
    keeping = bookkeeping_op(cache, setting, batch, model)
    bookkeeping_ms = compression_ms if keeping is None else (clock.op_ms(keeping.run, repeats, graph)
                                                             * keeping.per_step * layers)
    return {
        "attention_ms": attention_ms,
        "compression_ms": compression_ms,
        "bookkeeping_ms": bookkeeping_ms,
        "rest_ms": step_ms - attention_ms - bookkeeping_ms,
        "layers": layers,
        "compress_tokens_per_call": None if op is None else op.tokens_per_call,
        "timed_as": "cuda-graph replay" if graph and clock.cuda else "cuda events" if clock.cuda else "wall clock",
    }
