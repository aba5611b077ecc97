"""The caches: transformers ``Cache`` classes over the bitmap format, and the rules they follow.

- :mod:`.dynamic`: :class:`MustafarCache`, a growing compressed store + dense window per layer (eager decoding).
- :mod:`.layer`: :class:`MustafarLayer`, one layer of it; :mod:`.rows` its batch-row edits (beam search).
- :mod:`.rules`: which tokens are pruned when (window, chunk, left padding), shared by the layers.
- :mod:`.static`: :class:`StaticMustafarCache`, preallocated, graph-capturable (``torch.compile``/CUDA graphs).
- :mod:`.static_ops`: its decode attention and eviction, counts read on the device.

Source of the method: Mustafar, arXiv 2505.22913.
"""

from .dynamic import MustafarCache, check_backend, check_layer_idx
from .layer import NO_OFFLOADING, MustafarLayer
from .static import StaticMustafarCache, StaticMustafarLayer
from .static_ops import static_decode_attention, static_evict

__all__ = ["MustafarCache", "MustafarLayer", "NO_OFFLOADING", "StaticMustafarCache", "StaticMustafarLayer",
           "check_backend", "check_layer_idx", "static_decode_attention", "static_evict"]
