"""The backend table: which code serves a decode step, a compression or a static (graph) step.

Every caller (:mod:`mustafar.ops` for the dynamic cache, :mod:`mustafar.cache.static_ops` for the static
one) asks :func:`pick` and runs the entry it returns; nobody re-derives the fall-through.

Entries, in the priority order of ``backend="auto"`` (:data:`TABLE`):

1. ``"cuda"``: the CUDA C++ kernels of ``csrc/`` (launcher :mod:`mustafar.launch.cuda`, compiled at
   first use): CUDA tensors on compute capability >= 8.0, fp16/bf16, head_dim 64 or 128, at most 16
   query rows per KV head and a bool or no mask. Serves all four operations; FP8 kept values for
   the decode operations on compute capability >= 8.9, for the compression ones on any.
2. ``"triton"``: the ``@triton.jit`` kernels of :mod:`mustafar.kernels` (launchers in
   :mod:`mustafar.launch`): CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when asked for
   explicitly (``"auto"`` never picks the interpreter). Decode and compress only: it has no static form,
   so an explicit ``"triton"`` serves the static operations as ``"auto"`` does.
3. ``"torch"``: the PyTorch references of :mod:`mustafar.reference`, any device, any input.

FP8 kept values (``kept_dtype=torch.float8_e4m3fn``, :mod:`mustafar.fp8`): the CUDA entry decodes them
(``decode`` and ``static_decode``, compute capability >= 8.9) and compresses into FP8 stores (``compress``
and ``static_evict``, bit-identical to the reference); Triton and the reference read and write them too.

Operations (:data:`OPS`) and the inputs their ``supports_<op>`` methods read (keywords of :func:`pick`):

- ``"decode"``: ``query, key_cache, value_cache, key_window, attention_mask``;
- ``"compress"``: ``x, values, bitmaps``;
- ``"static_decode"``: ``query, key_cache, value_cache, key_window``;
- ``"static_evict"``: ``x`` (the ring), ``values, bitmaps`` (the store's storage).

A ``supports_<op>`` method returns ``None`` when the entry serves the inputs, else the reason it does not.
Adding a backend is one new class with those methods and the operations, and one line in :data:`TABLE`.

Example::

    >>> import torch, mustafar
    >>> kv = mustafar.compress(torch.randn(1, 2, 8, 64), 0.5)
    >>> mustafar.resolve_backend("decode", query=torch.randn(1, 2, 1, 64), key_cache=kv, value_cache=kv)
    'torch'
"""

from __future__ import annotations

import os

import torch

from .errors import UnsupportedHardwareError
from .format import BitmapKV, expand_store
from .fp8 import quantize_kept
from .reference import compress_reference, decode_attention_reference

__all__ = ["BACKENDS", "OPS", "TABLE", "UnsupportedHardwareError", "available_backends", "pick", "resolve_backend",
           "triton_available"]

#: Operations a backend may serve.
OPS = ("decode", "compress", "static_decode", "static_evict")


def triton_available() -> bool:
    """Whether the Triton kernels can run here (a CUDA device, or the Triton interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


class TorchBackend:
    """The PyTorch references: any device, any input; the fallback and the test oracle."""

    name = "torch"
    #: Device types ``"auto"`` may pick this entry for (``None``: any).
    auto_devices = None

    def unavailable(self) -> str | None:
        return None

    def supports_decode(self, **_) -> str | None:
        return None

    supports_compress = supports_static_decode = supports_static_evict = supports_decode

    def decode(self, query, key_cache: BitmapKV, value_cache: BitmapKV, key_window, value_window, scale: float,
               attention_mask) -> torch.Tensor:
        keys, values = key_cache.decompress(), value_cache.decompress()
        if key_window is not None:
            keys = torch.cat([keys, key_window], dim=2)
            values = torch.cat([values, value_window], dim=2)
        return decode_attention_reference(query, keys, values, scale, attention_mask)

    def compress(self, x: torch.Tensor, sparsity: float, values: torch.Tensor, bitmaps: torch.Tensor,
                 scales: torch.Tensor | None = None) -> None:
        kept, bitmaps[...] = compress_reference(x, sparsity)
        if scales is None:
            values[...] = kept
        else:
            values[...], scales[...] = quantize_kept(kept)

    def static_decode(self, query, key_store: BitmapKV, value_store: BitmapKV, key_ring, value_ring, scale: float,
                      length: torch.Tensor) -> torch.Tensor:
        window = key_ring.shape[2]
        n_comp, n_win = (length - window).clamp(min=0), length.clamp(max=window)
        keys = torch.cat([expand_store(*key_store.storage, key_store.head_dim, key_store.scale_storage), key_ring],
                         dim=2)
        values = torch.cat([expand_store(*value_store.storage, value_store.head_dim, value_store.scale_storage),
                            value_ring], dim=2)
        capacity = key_store.capacity
        slots = torch.arange(capacity + window, device=query.device)
        held = torch.where(slots < capacity, slots < n_comp, slots - capacity < n_win)
        return decode_attention_reference(query, keys, values, scale, held.view(1, 1, 1, -1))

    def static_evict(self, ring: torch.Tensor, store: BitmapKV, length: torch.Tensor) -> None:
        w = ring.shape[2]
        values, bitmaps = store.storage
        capacity = values.shape[2]
        if capacity == 0:
            return
        slot = (length % w).view(1)
        row = (length - w).clamp(min=0, max=capacity - 1).view(1)
        active = (length >= w) & (length - w < capacity)
        new_values, new_bitmaps = compress_reference(ring.index_select(2, slot), store.sparsity)
        if store.is_fp8:
            new_values, new_scales = quantize_kept(new_values)
            scales = store.scale_storage
            scales.index_copy_(2, row, torch.where(active, new_scales, scales.index_select(2, row)))
            values, new_values = values.view(torch.uint8), new_values.view(torch.uint8)  # where has no fp8 kernel
        values.index_copy_(2, row, torch.where(active, new_values, values.index_select(2, row)))
        bitmaps.index_copy_(2, row, torch.where(active, new_bitmaps, bitmaps.index_select(2, row)))


class TritonBackend:
    """The Triton kernels: decode and compress (no static form)."""

    name = "triton"
    auto_devices = frozenset({"cuda"})

    def unavailable(self) -> str | None:
        if triton_available():
            return None
        return "it needs the triton package and a CUDA device (or TRITON_INTERPRET=1)"

    def _device(self, tensor: torch.Tensor) -> str | None:
        if tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return f"it runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got device {tensor.device}"

    def supports_decode(self, query, **_) -> str | None:
        return self.unavailable() or self._device(query)

    def supports_compress(self, x, **_) -> str | None:
        return self.unavailable() or self._device(x)

    def decode(self, query, key_cache, value_cache, key_window, value_window, scale, attention_mask) -> torch.Tensor:
        from .launch.decode import decode_attention_triton

        return decode_attention_triton(query, key_cache, value_cache, key_window, value_window, scale, attention_mask)

    def compress(self, x, sparsity, values, bitmaps, scales=None) -> None:
        from .launch.compress import compress_triton

        compress_triton(x, sparsity, values, bitmaps, scales)


class CudaBackend:
    """The CUDA C++ kernels of ``csrc/``: all four operations, for the inputs :mod:`mustafar.launch.cuda` accepts."""

    name = "cuda"
    auto_devices = frozenset({"cuda"})
    _NEEDS_DECODE = ("a CUDA device of compute capability >= 8.0, fp16/bf16 tensors, head_dim 64 or 128, at most "
                     "16 query rows per KV head (q_heads // kv_heads * q_len), rows contiguous in storage whose "
                     "capacity is a multiple of 16 tokens, and a bool or no mask")
    _NEEDS_COMPRESS = "fp16/bf16 rows of head_dim 64 or 128 on a CUDA device of compute capability >= 8.0"
    _NO_FP8_DECODE = ("it reads FP8 kept values (kept_dtype=torch.float8_e4m3fn) on compute capability >= 8.9 only; "
                      "'auto' uses Triton for them")

    def unavailable(self) -> str | None:
        from .launch.cuda import cuda_available

        return None if cuda_available() else "it needs a CUDA device of compute capability >= 8.0"

    def supports_decode(self, query, key_cache, value_cache, key_window=None, attention_mask=None, **_) -> str | None:
        if key_cache.is_fp8 != value_cache.is_fp8:
            return "it reads FP8 kept values only when both the key and the value store hold them"
        if not query.is_cuda:
            return f"it runs on CUDA tensors, got device {query.device}"
        from .launch.cuda import cuda_available, cuda_supported, fp8_available

        if key_cache.is_fp8 and cuda_available() and not fp8_available():
            return self._NO_FP8_DECODE

        if cuda_available() and cuda_supported(query, key_cache, value_cache, key_window, attention_mask):
            return None
        return (f"it needs {self._NEEDS_DECODE}; got device {query.device}, dtype {query.dtype}, shape "
                f"{tuple(query.shape)}, kv_heads {key_cache.shape[1]}")

    def supports_static_decode(self, query, key_cache, value_cache, key_window, **_) -> str | None:
        return self.supports_decode(query, key_cache, value_cache, key_window)

    def supports_compress(self, x, values, bitmaps, **_) -> str | None:
        if not x.is_cuda:
            return f"it runs on CUDA tensors, got device {x.device}"
        from .launch.cuda import compress_supported

        if compress_supported(x, values, bitmaps):
            return None
        return f"it compresses {self._NEEDS_COMPRESS}; got device {x.device}, dtype {x.dtype}, shape {tuple(x.shape)}"

    supports_static_evict = supports_compress

    def decode(self, query, key_cache, value_cache, key_window, value_window, scale, attention_mask) -> torch.Tensor:
        from .launch.cuda import decode_attention_cuda

        return decode_attention_cuda(query, key_cache, value_cache, key_window, value_window, scale, attention_mask)

    def compress(self, x, sparsity, values, bitmaps, scales=None) -> None:
        from .launch.cuda import compress_cuda

        compress_cuda(x, values, bitmaps, scales=scales)

    def static_decode(self, query, key_store, value_store, key_ring, value_ring, scale, length) -> torch.Tensor:
        from .launch.cuda import decode_attention_cuda

        return decode_attention_cuda(query, key_store, value_store, key_ring, value_ring, scale, length=length)

    def static_evict(self, ring, store, length) -> None:
        from .launch.cuda import compress_cuda

        values, bitmaps = store.storage
        compress_cuda(ring, values, bitmaps, position=length, scales=store.scale_storage)


#: The entries in ``"auto"``'s priority order: the first that supports the inputs serves them.
TABLE = (CudaBackend(), TritonBackend(), TorchBackend())
#: The names ``backend=`` accepts.
BACKENDS = ("auto", "torch", "triton", "cuda")


def _entry(name: str):
    for entry in TABLE:
        if entry.name == name:
            return entry
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends() -> list[str]:
    """Backends that can run on this machine, besides ``"auto"`` (``"torch"`` first, then by increasing speed)."""
    return [name for name in BACKENDS[1:] if _entry(name).unavailable() is None]


def pick(op: str, backend: str = "auto", **inputs):
    """The table entry that serves operation ``op`` on ``inputs`` (keywords listed in the module docstring).

    ``"auto"``: the first entry of :data:`TABLE` whose ``supports_<op>`` accepts the inputs, among those
    ``"auto"`` may use on the inputs' device. An explicit backend: that entry, or, where it has no form of
    ``op`` (Triton's static operations), what ``"auto"`` picks.

    Raises:
        ValueError: ``op`` or ``backend`` unknown.
        UnsupportedHardwareError: an explicit backend that cannot serve the inputs, with the reason.
    """
    if backend != "auto":
        entry = _entry(backend)
        supports = getattr(entry, "supports_" + op, None)
        if supports is not None:
            reason = supports(**inputs)
            if reason is not None:
                raise UnsupportedHardwareError(f"backend={backend!r} cannot serve this {op}: {reason}")
            return entry
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    device = next(iter(inputs.values())).device
    for entry in TABLE:
        if entry.auto_devices is not None and device.type not in entry.auto_devices:
            continue
        supports = getattr(entry, "supports_" + op, None)
        if supports is not None and supports(**inputs) is None:
            return entry
    raise AssertionError("the torch entry serves every input")  # internal invariant: unreachable


def resolve_backend(op: str = "decode", backend: str = "auto", **inputs) -> str:
    """The name of the backend that serves ``op`` on ``inputs`` (what actually runs), e.g. for a benchmark's log.

    Inputs as for :func:`pick` (``query=, key_cache=, value_cache=`` and optionally ``key_window=``,
    ``attention_mask=`` for ``"decode"``).

    Raises:
        ValueError / UnsupportedHardwareError: as :func:`pick`.
    """
    return pick(op, backend, **inputs).name
