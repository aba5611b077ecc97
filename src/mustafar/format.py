"""The bitmap-compressed KV format.

Source: the per-token pruning of Mustafar (arXiv 2505.22913) keeps the same
number ``k_keep`` of entries in every token's head vector; this format exploits
that: no offsets and no prefix sums, O(1) append, trivially pageable.

For a cache tensor of logical shape ``[batch, kv_heads, tokens, head_dim]``:

- ``values``: ``[batch, kv_heads, tokens, k_keep]``, the cache dtype; the kept
  entries of each token in ascending channel order.
- ``bitmaps``: ``[batch, kv_heads, tokens, ceil(head_dim / 64)]`` int64; bit
  ``d % 64`` of word ``d // 64`` is set iff channel ``d`` was kept.

The rank of channel ``d`` in its token (the popcount of the lower bits) is its
index in ``values``. Bytes per token and head:
``k_keep * itemsize + 8 * ceil(head_dim / 64)`` (:func:`bytes_per_token`); for
head_dim 128 in fp16 that is 94 B at sparsity 0.7 (36.7 % of dense) and 144 B
at 0.5 (56.3 %).

**FP8 kept values** (``kept_dtype=torch.float8_e4m3fn``, issue 15): ``values`` are
``float8_e4m3fn`` and a third tensor ``scales [batch, kv_heads, tokens]`` in the cache
dtype holds one scale per token and head (the rule: :mod:`mustafar.fp8`); the bitmap is
the one of the cache dtype. Bytes per token and head: ``k_keep + 8 * ceil(head_dim / 64)
+ itemsize``: at head_dim 128, fp16, 57 B at sparsity 0.7 (22.3 % of dense), 82 B at 0.5
(32.0 %), 146 B at 0 (57.0 %).

Example::

    >>> import torch, mustafar
    >>> x = torch.randn(2, 4, 100, 128, dtype=torch.float16)
    >>> kv = mustafar.compress(x, 0.7)
    >>> kv.values.shape, kv.bitmaps.shape, kv.nbytes
    (torch.Size([2, 4, 100, 39]), torch.Size([2, 4, 100, 2]), 75200)
    >>> bool((kv.decompress() == mustafar.prune_per_token(x, 0.7)).all())
    True
"""

from __future__ import annotations

import copy

import torch

from ._checks import CACHE_DTYPES, check_head_dim, check_positive_int, check_sparsity, check_tensor
from .fp8 import FP8_DTYPE, check_kept_dtype, dequantize_kept, is_fp8, kept_itemsize, quantize_kept, scale_itemsize
from .pruning import keep_count, topk_mask

__all__ = ["BitmapKV", "bytes_per_token", "compress_rows", "dense_bytes_per_token", "WORD_BITS"]

#: Channels per bitmap word.
WORD_BITS = 64
#: Capacity granule in tokens: the GPU kernels stage whole 16-token tiles.
CAPACITY_GRANULE = 16
#: Capacity growth factor of appends: geometric (amortised O(1) per token) with at most 25 % slack ...
GROWTH = 1.25
#: ... and at most this many tokens of slack. A long store then grows by 1024 tokens at a time: one copy of it
#: per 1024 appended tokens, while decode attention reads the whole store at every step anyway (under 0.1 % more
#: traffic). Without the cap a 32k-token store decoding its first tokens took 25 % more memory than it holds:
#: capacity at a 32k prompt in 80 GiB, K0.7V0.7-fp8, 58 sequences where 69 fit by its bytes (H200, 2026-12-03).
GROWTH_MAX_TOKENS = 1024
_BYTE_BITS = 8


def num_words(head_dim: int) -> int:
    """Bitmap words per token: ``ceil(head_dim / 64)``."""
    return -(-head_dim // WORD_BITS)


def bytes_per_token(head_dim: int, sparsity: float, dtype: torch.dtype = torch.float16,
                    kept_dtype: torch.dtype | None = None) -> int:
    """Bytes one token of one KV head takes in the format.

    ``k_keep * itemsize + 8 * ceil(head_dim / 64)`` with kept values in the cache ``dtype`` (``kept_dtype``
    ``None`` or ``dtype``); ``k_keep * 1 + 8 * ceil(head_dim / 64) + itemsize`` (the scale) with
    ``kept_dtype=torch.float8_e4m3fn``.

    Raises:
        TypeError / ValueError: head_dim not an int in [1, 256], a bad sparsity, a dtype other than fp16/bf16/fp32,
            a ``kept_dtype`` other than those above.
    """
    head_dim = check_head_dim("head_dim", head_dim)
    if dtype not in CACHE_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    kept = check_kept_dtype(kept_dtype, dtype)
    return (keep_count(head_dim, sparsity) * kept_itemsize(kept, dtype) + 8 * num_words(head_dim)
            + scale_itemsize(kept, dtype))


def dense_bytes_per_token(head_dim: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes one token of one KV head takes dense: ``head_dim * itemsize``."""
    head_dim = check_head_dim("head_dim", head_dim)
    return head_dim * torch.empty((), dtype=dtype).element_size()


def pack_bitmaps(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask ``[..., head_dim]`` into int64 words ``[..., ceil(head_dim / 64)]``."""
    head_dim = mask.shape[-1]
    words = num_words(head_dim)
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, words * WORD_BITS - head_dim))
    shifts = torch.arange(_BYTE_BITS, device=mask.device, dtype=torch.uint8)
    as_bytes = (padded.reshape(*mask.shape[:-1], words * _BYTE_BITS, _BYTE_BITS) << shifts).sum(-1, dtype=torch.uint8)
    return as_bytes.contiguous().view(torch.int64)


def unpack_bitmaps(bitmaps: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmaps`: int64 words ``[..., words]`` -> bool ``[..., head_dim]``."""
    as_bytes = bitmaps.contiguous().view(torch.uint8)
    shifts = torch.arange(_BYTE_BITS, device=bitmaps.device, dtype=torch.uint8)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*bitmaps.shape[:-1], bitmaps.shape[-1] * WORD_BITS)[..., :head_dim].bool()


def compress_mask(x: torch.Tensor, mask: torch.Tensor, k_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, bitmaps)`` of ``x`` under a keep-``mask`` with exactly ``k_keep`` set bits per token."""
    kept = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :k_keep]
    return x.gather(-1, kept), pack_bitmaps(mask)


def compress_rows(x: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token prune and compress ``x [..., head_dim]`` -> ``(values [..., k_keep], bitmaps [..., words])``.

    Keeps the ``k_keep`` entries of largest ``|x|`` per row, ties to the lower channel: the rule every
    backend's compression reproduces bit for bit (this is the PyTorch reference of it).
    """
    k_keep = keep_count(x.shape[-1], sparsity)
    return compress_mask(x, topk_mask(x.abs(), k_keep), k_keep)


def expand(values: torch.Tensor, bitmaps: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Dense ``[..., head_dim]`` tensor from ``values [..., k_keep]`` and ``bitmaps [..., words]``."""
    mask = unpack_bitmaps(bitmaps, head_dim)
    if values.shape[-1] == 0:
        return torch.zeros(*mask.shape, dtype=values.dtype, device=values.device)
    rank = (mask.cumsum(-1) - 1).clamp_(min=0)
    gathered = values.gather(-1, rank)
    return torch.where(mask, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


class BitmapKV:
    """A compressed K or V cache ``[batch, kv_heads, tokens, head_dim]`` in the bitmap format.

    Storage grows along the token axis by :data:`GROWTH` (25 % of the capacity), at most by
    :data:`GROWTH_MAX_TOKENS` tokens, never below what an append needs, rounded up to the 16-token granule: unused
    room stays under 1024 + 16 tokens and, past a few granules, 25 %. :meth:`append` is amortised O(1) per token up
    to 4096 tokens and then costs one copy of the store per 1024 tokens. ``values`` and ``bitmaps`` are views of the
    first ``tokens`` rows.

    Attributes:
        head_dim: channels per head (1..256).
        sparsity: fraction of entries zeroed per token, in [0, 1).
        k_keep: entries kept per token, ``head_dim - floor(sparsity * head_dim)``.
    """

    #: True for a view made by :meth:`first_tokens` until its first write (:meth:`reserve` copies its rows).
    _shares_buffers = False

    def __init__(self, values: torch.Tensor, bitmaps: torch.Tensor, head_dim: int, sparsity: float,
                 check_bits: bool = True, scales: torch.Tensor | None = None):
        """Wrap ``values [b, h, t, k_keep]`` and ``bitmaps [b, h, t, words]`` (int64) as a store of ``t`` tokens.

        With ``check_bits`` (default), every bitmap row must have exactly ``k_keep`` bits set, none at or past
        ``head_dim`` (one pass over the bitmaps, a host synchronisation on a GPU). FP8 kept values
        (``values`` of dtype ``float8_e4m3fn``) need ``scales [b, h, t]`` in the cache dtype (fp16/bf16/fp32;
        the rule: :mod:`mustafar.fp8`); other values take no ``scales``.

        Raises:
            TypeError / ValueError: dtypes, shapes, devices or bitmaps that do not form the format.
        """
        check_tensor("values", values, ndim=4, dtypes=CACHE_DTYPES + ((FP8_DTYPE,) if FP8_DTYPE else ()))
        check_tensor("bitmaps", bitmaps, ndim=4, dtypes=(torch.int64,))
        _check_scales(values, scales)
        self.head_dim = check_head_dim("head_dim", head_dim)
        self.sparsity = check_sparsity("sparsity", sparsity)
        self.k_keep = keep_count(self.head_dim, self.sparsity)
        if values.shape[-1] != self.k_keep or values.shape[1] < 1:
            raise ValueError(f"values must be [batch, kv_heads >= 1, tokens, k_keep={self.k_keep}], "
                             f"got {tuple(values.shape)}")
        if bitmaps.shape[:-1] != values.shape[:-1] or bitmaps.shape[-1] != num_words(self.head_dim):
            raise ValueError(
                f"bitmaps must be {tuple(values.shape[:-1]) + (num_words(self.head_dim),)}, got {tuple(bitmaps.shape)}"
            )
        if bitmaps.device != values.device:
            raise ValueError(f"bitmaps must be on the values' device {values.device}, got {bitmaps.device}")
        if check_bits:
            self._check_bits(bitmaps)
        self._values, self._bitmaps, self._tokens, self._scales = values, bitmaps, values.shape[2], scales

    def _check_bits(self, bitmaps: torch.Tensor) -> None:
        bits = unpack_bitmaps(bitmaps, bitmaps.shape[-1] * WORD_BITS)
        counts_ok = bool((bits[..., : self.head_dim].sum(-1) == self.k_keep).all())
        if not counts_ok or bool(bits[..., self.head_dim :].any()):
            raise ValueError(f"bitmaps must have exactly k_keep={self.k_keep} bits set per row, all below "
                             f"head_dim={self.head_dim} (the per-token format); got rows that do not")

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_heads: int,
        head_dim: int,
        sparsity: float,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        capacity: int = 0,
        kept_dtype: torch.dtype | None = None,
    ) -> "BitmapKV":
        """An empty store with room for ``capacity`` tokens before it grows.

        ``dtype``: the cache dtype; ``kept_dtype``: ``None`` or ``dtype`` (kept values in the cache dtype)
        or ``torch.float8_e4m3fn`` (FP8 kept values and one scale per token-head, see :mod:`mustafar.fp8`).

        Raises:
            TypeError: a ``kept_dtype`` other than those (``torch.int8``, ``torch.float8_e5m2``, ...).
        """
        check_positive_int("batch", batch)
        check_positive_int("kv_heads", kv_heads)
        check_positive_int("capacity", capacity, minimum=0)
        k_keep = keep_count(check_head_dim("head_dim", head_dim), sparsity)
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32 (the cache dtype), got {dtype}")
        kept = check_kept_dtype(kept_dtype, dtype)
        capacity = _round_up(capacity, CAPACITY_GRANULE)
        values = torch.zeros(batch, kv_heads, capacity, k_keep, dtype=kept or dtype, device=device)
        bitmaps = torch.zeros(batch, kv_heads, capacity, num_words(head_dim), dtype=torch.int64, device=device)
        scales = torch.zeros(batch, kv_heads, capacity, dtype=dtype, device=device) if kept else None
        store = cls(values, bitmaps, head_dim, sparsity, check_bits=False, scales=scales)
        store._tokens = 0
        return store

    # ------------------------------------------------------------------ views
    @property
    def tokens(self) -> int:
        """Number of tokens held."""
        return self._tokens

    @property
    def capacity(self) -> int:
        """Tokens that fit before the storage grows."""
        return self._values.shape[2]

    @property
    def values(self) -> torch.Tensor:
        """``[batch, kv_heads, tokens, k_keep]``, cache dtype (a view)."""
        return self._values.narrow(2, 0, self._tokens)

    @property
    def bitmaps(self) -> torch.Tensor:
        """``[batch, kv_heads, tokens, ceil(head_dim / 64)]`` int64 (a view)."""
        return self._bitmaps.narrow(2, 0, self._tokens)

    @property
    def scales(self) -> torch.Tensor | None:
        """``[batch, kv_heads, tokens]``, cache dtype (a view): one scale per token-head of FP8 kept values;
        ``None`` when the kept values are in the cache dtype."""
        return None if self._scales is None else self._scales.narrow(2, 0, self._tokens)

    @property
    def scale_storage(self) -> torch.Tensor | None:
        """The whole scales buffer ``[b, h, capacity]`` (FP8 kept values), else ``None``; see :attr:`storage`."""
        return self._scales

    @property
    def kept_dtype(self) -> torch.dtype:
        """dtype of :attr:`values`: the cache dtype, or ``torch.float8_e4m3fn``."""
        return self._values.dtype

    @property
    def is_fp8(self) -> bool:
        """Whether the kept values are FP8 (e4m3) with a scale per token-head."""
        return self._scales is not None

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers ``(values [b, h, capacity, k_keep], bitmaps [b, h, capacity, words])``.

        Rows past :attr:`tokens` are room for appends (their content is unspecified); the static
        decode path writes and reads them with device-side counts.
        """
        return self._values, self._bitmaps

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical dense shape ``(batch, kv_heads, tokens, head_dim)``."""
        b, h = self._values.shape[:2]
        return (b, h, self._tokens, self.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        """The cache dtype (of :meth:`decompress`, of the rows appended, of the scales)."""
        return self._values.dtype if self._scales is None else self._scales.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (values + bitmaps + FP8 scales): ``batch * kv_heads * tokens * bytes_per_token``."""
        scales = 0 if self._scales is None else self.scales.numel() * self._scales.element_size()
        return self.values.numel() * self.values.element_size() + self.bitmaps.numel() * 8 + scales

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated, including room for tokens not yet appended."""
        scales = 0 if self._scales is None else self._scales.numel() * self._scales.element_size()
        return self._values.numel() * self._values.element_size() + self._bitmaps.numel() * 8 + scales

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same tokens would take dense in the cache dtype."""
        b, h, t, d = self.shape
        return b * h * t * d * torch.empty((), dtype=self.dtype).element_size()

    def __repr__(self) -> str:
        return (
            f"BitmapKV(shape={self.shape}, sparsity={self.sparsity}, k_keep={self.k_keep}, "
            f"dtype={str(self.dtype).replace('torch.', '')}"
            + (", kept_dtype=float8_e4m3fn" if self.is_fp8 else "") + f", nbytes={self.nbytes})"
        )

    # -------------------------------------------------------------- operations
    def decompress(self) -> torch.Tensor:
        """Dense ``[batch, kv_heads, tokens, head_dim]`` tensor in the cache dtype, zeros where pruned
        (FP8 kept values dequantised first, see :mod:`mustafar.fp8`)."""
        return expand_store(self.values, self.bitmaps, self.head_dim, self.scales)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` in total: the capacity grows by :data:`GROWTH`, by at most
        :data:`GROWTH_MAX_TOKENS` tokens, to ``tokens`` if that is more, rounded up to the granule (see the class)."""
        if tokens <= self.capacity and not self._shares_buffers:
            return
        if self._shares_buffers:  # a view (first_tokens): copy on the first write, the rows needed only
            new_capacity = _round_up(max(tokens, self._tokens), CAPACITY_GRANULE)
        else:
            grown = min(int(GROWTH * self.capacity), self.capacity + GROWTH_MAX_TOKENS)
            new_capacity = _round_up(max(tokens, grown), CAPACITY_GRANULE)
        self._shares_buffers = False
        self._values = _grown(self._values, new_capacity, self._tokens)
        self._bitmaps = _grown(self._bitmaps, new_capacity, self._tokens)
        if self._scales is not None:
            self._scales = _grown(self._scales.unsqueeze(-1), new_capacity, self._tokens).squeeze(-1)

    def append(self, x: torch.Tensor) -> None:
        """Prune (per token) and compress new rows ``x [batch, kv_heads, n, head_dim]`` and append them.

        Compresses with :func:`compress_rows` in PyTorch on ``x``'s device; the caches call
        :func:`mustafar.ops.append` instead, which runs the same rule in the fastest backend (identical bits).

        Raises:
            TypeError / ValueError: ``x`` of another dtype, batch, head count or head_dim.
        """
        self.check_rows(x)
        values, bitmaps = compress_rows(x, self.sparsity)
        scales = None
        if self.is_fp8:
            values, scales = quantize_kept(values)
        self.append_compressed(values, bitmaps, scales)

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more rows, already written into :attr:`storage` after the held ones (by a kernel).

        Raises:
            ValueError: the rows would pass the capacity (call :meth:`reserve` first).
        """
        if not 0 <= tokens <= self.capacity - self._tokens:
            raise ValueError(f"tokens must be in [0, {self.capacity - self._tokens}] (the free capacity), got {tokens}")
        self._tokens += tokens

    def append_compressed(self, values: torch.Tensor, bitmaps: torch.Tensor,
                          scales: torch.Tensor | None = None) -> None:
        """Append rows already in the format (``values [b, h, n, k_keep]``, ``bitmaps [b, h, n, words]``,
        and for FP8 kept values ``scales [b, h, n]``).

        Raises:
            TypeError: ``values`` not of the store's kept dtype, ``bitmaps`` not int64, scales missing or not
                of the cache dtype (FP8), or given (no FP8).
            ValueError: wrong ranks or shapes.
        """
        check_tensor("values", values, ndim=4, dtypes=(self.kept_dtype,))
        check_tensor("bitmaps", bitmaps, ndim=4, dtypes=(torch.int64,))
        _check_scales(values, scales)
        if scales is not None and scales.dtype != self.dtype:
            raise TypeError(f"scales must have the store's cache dtype {self.dtype}, got {scales.dtype}")
        if values.device != self.device or bitmaps.device != self.device:
            raise ValueError(f"values and bitmaps must be on the store's device {self.device}, got "
                             f"{values.device} and {bitmaps.device}")
        if values.shape[:2] != self._values.shape[:2] or values.shape[-1] != self.k_keep:
            raise ValueError(f"values must be [{self._values.shape[0]}, {self._values.shape[1]}, n, {self.k_keep}], "
                             f"got {tuple(values.shape)}")
        if bitmaps.shape != values.shape[:-1] + (self._bitmaps.shape[-1],):
            raise ValueError(f"bitmaps must be {tuple(values.shape[:-1]) + (self._bitmaps.shape[-1],)}, "
                             f"got {tuple(bitmaps.shape)}")
        self._check_bits(bitmaps)
        n = values.shape[2]
        self.reserve(self._tokens + n)
        self._values[:, :, self._tokens : self._tokens + n] = values
        self._bitmaps[:, :, self._tokens : self._tokens + n] = bitmaps
        if scales is not None:
            self._scales[:, :, self._tokens : self._tokens + n] = scales
        self._tokens += n

    def truncate(self, tokens: int) -> None:
        """Keep only the first ``tokens`` tokens (for ``crop``); storage is kept for reuse."""
        tokens = check_positive_int("tokens", tokens, minimum=0)
        if not 0 <= tokens <= self._tokens:
            raise ValueError(f"tokens must be in [0, {self._tokens}], got {tokens}")
        self._tokens = tokens

    def first_tokens(self, tokens: int) -> "BitmapKV":
        """A view of this store's first ``tokens`` tokens: same buffers (``[batch, kv_heads, tokens, head_dim]``
        as a store), this store unchanged. Appending to the view first copies its rows into buffers of its own
        (:meth:`reserve`), so it never writes into this store's.

        Raises:
            ValueError: ``tokens`` outside ``[0, self.tokens]``.
        """
        view = copy.copy(self)
        view.truncate(tokens)
        view._shares_buffers = True
        return view

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the batch rows in ``index`` (beam search, batch selection).

        Raises:
            TypeError: ``index`` not a 1-d integer tensor. ValueError: empty, or (a CPU index) out of range.
        """
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index must be a 1-d int32/int64 tensor of batch rows, got "
                            f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
        batch = self._values.shape[0]
        if index.numel() == 0 or (index.device.type == "cpu" and not bool(((index >= 0) & (index < batch)).all())):
            raise ValueError(f"index must select at least one of the {batch} batch rows, in [0, {batch}), "
                             f"got {index.tolist() if index.numel() <= 16 else tuple(index.shape)}")
        index = index.to(self.device)
        self._values = self._values.index_select(0, index)
        self._bitmaps = self._bitmaps.index_select(0, index)
        if self._scales is not None:
            self._scales = self._scales.index_select(0, index)

    def check_rows(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is ``[batch, kv_heads, n, head_dim]`` rows of this store's dtype, device and sizes."""
        check_tensor("x", x, ndim=4)
        b, h = self._values.shape[:2]
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the store's dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"x must be on the store's device {self.device}, got {x.device}")
        if x.shape[0] != b or x.shape[1] != h or x.shape[3] != self.head_dim:
            raise ValueError(f"x must be [{b}, {h}, n, {self.head_dim}], got {tuple(x.shape)}")


def expand_store(values: torch.Tensor, bitmaps: torch.Tensor, head_dim: int,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`expand` of a store's rows, FP8 kept values dequantised with ``scales [...]`` first (cache dtype)."""
    return expand(values if scales is None else dequantize_kept(values, scales), bitmaps, head_dim)


def _check_scales(values: torch.Tensor, scales: torch.Tensor | None) -> None:
    """FP8 ``values [b, h, t, k]`` need ``scales [b, h, t]`` of a cache dtype on their device; others none."""
    if not is_fp8(values.dtype):
        if scales is not None:
            raise TypeError(f"scales are only for float8_e4m3fn values, got values of {values.dtype} and scales")
        return
    if scales is None:
        raise TypeError("scales must be given with float8_e4m3fn values ([batch, kv_heads, tokens], cache dtype), "
                        "got None")
    check_tensor("scales", scales, ndim=3)
    if scales.shape != values.shape[:3] or scales.device != values.device:
        raise ValueError(f"scales must be {tuple(values.shape[:3])} on {values.device}, got {tuple(scales.shape)} "
                         f"on {scales.device}")


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


def _grown(buffer: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    grown = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[3])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown
