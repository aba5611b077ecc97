"""The CUDA C++ compress kernel writing FP8 kept values (issue 15), bit-identical to the reference.

GPU tests (marked ``gpu``, skipped without CUDA): ``compress_into(..., backend="cuda")`` and the static eviction
(``static_evict(..., backend="cuda")``) against the PyTorch reference on the CPU, ``compress_reference`` followed
by ``quantize_kept`` (the rule of :mod:`mustafar.fp8`): e4m3 bits, bitmaps and scale bits (NaN included) equal,
over random rows and rows with ties, zeros, tiny and huge values, non-finite entries and e4m3 rounding ties.
CPU tests: the backend table's wiring of FP8 compression to the CUDA entry (what can be checked without a GPU).

Run on a CUDA machine: ``pytest -q tests/test_gpu_compress_fp8.py``.
"""

from __future__ import annotations

import pytest
import torch

from mustafar import BitmapKV
from mustafar.backends import CudaBackend, UnsupportedHardwareError, resolve_backend
from mustafar.cache.static_ops import static_evict
from mustafar.fp8 import E4M3_MAX, quantize_kept
from mustafar.launch import cuda as cuda_launch
from mustafar.ops import compress_into
from mustafar.pruning import keep_count
from mustafar.reference import compress_reference

FP8 = torch.float8_e4m3fn
DTYPES = (torch.float16, torch.bfloat16)
SPARSITIES = (0.0, 0.5, 0.7)
HAS_CUDA = torch.cuda.is_available()
_BITS = {1: torch.uint8, 2: torch.int16, 8: torch.int64}


def on_gpu(test):
    """Mark ``test`` as a GPU test, skipped without CUDA."""
    skip = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU as integers of its size (compares NaN payloads and signed zeros too).

    e4m3 NaNs (0x7F, 0xFF) read as 0x7F: the kernel writes torch's NaN 0x7F, but the reference on the CPU leaves
    the sign of a NaN to vectorisation (its AVX clamp ORs an all-ones NaN mask into some lanes only).
    """
    bits = t.cpu().view(_BITS[t.element_size()])
    if t.dtype in (FP8, torch.uint8):
        bits = torch.where(bits & 0x7F == 0x7F, torch.full_like(bits, 0x7F), bits)
    return bits


def _view_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed in place as integers of its size."""
    return t.view(_BITS[t.element_size()])


def _assert_same_bits(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    got, want = _bits(out), _bits(ref)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if not torch.equal(got, want):
        rows = (got != want).reshape(-1, got.shape[-1] if got.dim() == 4 else 1).any(-1).nonzero().flatten()
        raise AssertionError(f"{name}: {rows.numel()} rows differ from the reference, first at flat row "
                             f"{rows[:5].tolist()}")


def _e4m3_ties(head_dim: int, dtype: torch.dtype, gen: torch.Generator, exponent: int) -> torch.Tensor:
    """A row of amax ``448 * 2**exponent`` (scale exactly ``2**exponent``) whose other entries lie halfway between
    consecutive e4m3 values (after the division by the scale): round-to-nearest-even ties, subnormals included."""
    codes = torch.arange(127, dtype=torch.uint8).view(FP8).double()  # +0 .. 448, increasing
    ties = (codes[1:] + codes[:-1]) / 2
    ties = ties[torch.linspace(0, ties.numel() - 1, head_dim - 1).round().long()]
    signs = torch.where(torch.rand(head_dim - 1, generator=gen) < 0.5, -1.0, 1.0).double()
    row = torch.cat([torch.tensor([E4M3_MAX], dtype=torch.double), ties * signs]) * 2.0 ** exponent
    return row[torch.randperm(head_dim, generator=gen)].to(dtype)


def _special_rows(head_dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows ``[S, head_dim]`` that stress the rule: ties, zeros, tiny and huge values, inf and NaN entries."""
    finfo = torch.finfo(dtype)
    nan, inf = float("nan"), float("inf")
    randn = lambda: torch.randn(head_dim, generator=gen)  # noqa: E731
    sign = lambda: torch.where(torch.rand(head_dim, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    rows = [
        torch.zeros(head_dim),                                     # all zero: scale 0, zeros stored
        torch.where(torch.arange(head_dim) % 3 == 0, -0.0, 0.0),   # signed zeros
        torch.randint(-2, 3, (head_dim,), generator=gen).float(),  # ties among few magnitudes
        sign(),                                                    # every magnitude tied
        randn() * finfo.tiny * 4,                                  # tiny: the scale floor, subnormal inputs
        randn() * finfo.tiny / 64,                                 # subnormal only
        sign() * finfo.max * (0.5 + torch.rand(head_dim, generator=gen) / 2),  # near the dtype's max
        sign() * finfo.max,                                        # at the dtype's max
    ]
    rows = [row.to(dtype) for row in rows]
    rows += [_e4m3_ties(head_dim, dtype, gen, 0), _e4m3_ties(head_dim, dtype, gen, -3)]
    for entries in ({3: inf}, {0: -inf, head_dim - 1: inf}, {5: nan}, {1: -nan, 7: inf, 8: nan},
                    {c: nan for c in range(2, head_dim)}, {c: -inf for c in range(0, head_dim, 2)}):
        row = randn().to(dtype)
        for channel, value in entries.items():
            row[channel] = value
        rows.append(row)
    return torch.stack(rows)


def _rows(shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows of per-token magnitudes 2**-12 .. 2**12 with the special rows spread over them (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-12, 13, (b, h, n, 1), generator=gen).float())
    x = x.to(dtype)
    special = _special_rows(d, dtype, gen)
    flat = x.view(-1, d)
    count = min(special.shape[0], flat.shape[0])
    flat[torch.linspace(0, flat.shape[0] - 1, count).round().long()] = special[:count]
    return x


def _reference(x: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e4m3 values, bitmaps, scales)`` of the PyTorch reference, on the CPU."""
    kept, bitmaps = compress_reference(x.cpu(), sparsity)
    q, scales = quantize_kept(kept)
    return q, bitmaps, scales


@on_gpu
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fp8_compress_is_bit_exact(dtype, head_dim, sparsity):
    """Three CTAs of rows per (batch, head), written at a token offset of a larger store (nothing else touched)."""
    b, h, n, offset = 2, 3, 300, 7
    x = _rows((b, h, n, head_dim), dtype, seed=head_dim + int(10 * sparsity)).cuda()
    store = BitmapKV.empty(b, h, head_dim, sparsity, dtype=dtype, device="cuda", capacity=offset + n + 9,
                           kept_dtype=FP8)
    values, bitmaps = store.storage
    scales = store.scale_storage
    assert resolve_backend("compress", x=x, values=values[:, :, offset:offset + n],
                           bitmaps=bitmaps[:, :, offset:offset + n]) == "cuda"
    compress_into(x, sparsity, values, bitmaps, offset, backend="cuda", scales=scales)
    q, ref_bitmaps, ref_scales = _reference(x, sparsity)
    rows = slice(offset, offset + n)
    _assert_same_bits("values", values[:, :, rows], q)
    _assert_same_bits("bitmaps", bitmaps[:, :, rows], ref_bitmaps)
    _assert_same_bits("scales", scales[:, :, rows], ref_scales)
    outside = torch.ones(values.shape[2], dtype=torch.bool)
    outside[rows] = False
    for name, buffer in (("values", values), ("bitmaps", bitmaps), ("scales", scales)):
        assert not bool(_bits(buffer)[:, :, outside].any()), f"{name} written outside the rows compressed"


@on_gpu
@pytest.mark.parametrize("head_dim,sparsity", [(64, 0.5), (128, 0.7), (128, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fp8_compress_equals_triton_on_finite_rows(dtype, head_dim, sparsity):
    pytest.importorskip("triton")
    x = _rows((3, 2, 257, head_dim), dtype, seed=head_dim + 1).cuda()
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype, device="cuda"))
    out = {}
    for backend in ("cuda", "triton"):
        store = BitmapKV.empty(3, 2, head_dim, sparsity, dtype=dtype, device="cuda", capacity=257, kept_dtype=FP8)
        compress_into(x, sparsity, *store.storage, 0, backend=backend, scales=store.scale_storage)
        out[backend] = store.storage + (store.scale_storage,)
    for name, cuda, triton in zip(("values", "bitmaps", "scales"), out["cuda"], out["triton"]):
        _assert_same_bits(name, cuda, triton)


@on_gpu
@pytest.mark.parametrize("head_dim,sparsity", [(64, 0.5), (128, 0.7), (128, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fp8_static_eviction_is_bit_exact(dtype, head_dim, sparsity):
    """The ring's token at ``length % w`` goes to store row ``length - w``; nothing before ``w`` or past capacity.

    The reference is the torch entry's static eviction on CPU copies; both stores start from the same nonzero
    bits, so rows the eviction must leave alone are checked too.
    """
    b, h, window, capacity = 2, 3, 5, 16
    gen = torch.Generator().manual_seed(head_dim)
    stores = {}
    for device in ("cuda", "cpu"):
        stores[device] = BitmapKV.empty(b, h, head_dim, sparsity, dtype=dtype, device=device, capacity=capacity,
                                        kept_dtype=FP8)
    values, bitmaps = stores["cpu"].storage
    start = (torch.randint(0, 127, values.shape, generator=gen, dtype=torch.uint8),
             torch.randint(0, 2 ** 62, bitmaps.shape, generator=gen, dtype=torch.int64),
             torch.randn(b, h, capacity, generator=gen).to(dtype))
    for store in stores.values():
        for buffer, init in zip(store.storage + (store.scale_storage,), start):
            _view_bits(buffer).copy_(_bits(init))
    cuda, cpu = stores["cuda"], stores["cpu"]
    assert resolve_backend("static_evict", x=torch.zeros(b, h, window, head_dim, dtype=dtype, device="cuda"),
                           values=cuda.storage[0], bitmaps=cuda.storage[1]) == "cuda"
    lengths = [0, 3, 4, 5, 6, 9, 12, window + capacity - 1, window + capacity, window + capacity + 3]
    for step, length in enumerate(lengths):
        ring = _rows((b, h, window, head_dim), dtype, seed=100 * head_dim + step)
        static_evict(ring.cuda(), cuda, torch.tensor(length, device="cuda"), backend="cuda")
        static_evict(ring, cpu, torch.tensor(length), backend="torch")
        for name, out, ref in zip(("values", "bitmaps", "scales"), cuda.storage + (cuda.scale_storage,),
                                  cpu.storage + (cpu.scale_storage,)):
            _assert_same_bits(f"{name} after length {length}", out, ref)


@on_gpu
def test_cuda_fp8_compress_of_an_empty_input_writes_nothing():
    x = torch.randn(1, 2, 0, 64, dtype=torch.float16, device="cuda")
    store = BitmapKV.empty(1, 2, 64, 0.5, dtype=torch.float16, device="cuda", capacity=16, kept_dtype=FP8)
    compress_into(x, 0.5, *store.storage, 0, backend="cuda", scales=store.scale_storage)
    assert not bool(_bits(store.storage[0]).any()) and not bool(_bits(store.scale_storage).any())


# ---------------------------------------------------------------- CPU: the table's wiring


def _fp8_store(dtype=torch.float16, head_dim=64):
    return BitmapKV.empty(1, 2, head_dim, 0.5, dtype=dtype, capacity=16, kept_dtype=FP8)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU's refusals")
def test_the_cuda_entry_refuses_fp8_compression_on_the_cpu_for_the_device_only():
    x = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    store = _fp8_store()
    values, bitmaps = store.storage
    for reason in (CudaBackend().supports_compress(x=x, values=values, bitmaps=bitmaps),
                   CudaBackend().supports_static_evict(x=x, values=values, bitmaps=bitmaps)):
        assert "CUDA tensors" in reason and "FP8" not in reason
    assert resolve_backend("compress", x=x, values=values, bitmaps=bitmaps) == "torch"
    with pytest.raises(UnsupportedHardwareError, match="CUDA tensors"):
        compress_into(x, 0.5, values, bitmaps, 0, backend="cuda", scales=store.scale_storage)


class _OnCuda:
    """A CPU tensor that says it is on CUDA: :func:`compress_supported` reads only its dtype, shape and strides."""

    is_cuda = True

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


@pytest.mark.parametrize("dtype,head_dim,kept,expected", [
    (torch.float16, 64, FP8, True), (torch.bfloat16, 128, FP8, True), (torch.float16, 128, torch.float16, True),
    (torch.float16, 64, torch.bfloat16, False), (torch.float32, 64, FP8, False), (torch.float16, 80, FP8, False),
])
def test_compress_supported_accepts_fp8_stores(monkeypatch, dtype, head_dim, kept, expected):
    monkeypatch.setattr(cuda_launch, "cuda_available", lambda: True)
    x = _OnCuda(torch.randn(1, 2, 5, head_dim).to(dtype))
    values = torch.zeros(1, 2, 16, keep_count(head_dim, 0.5), dtype=kept)
    bitmaps = torch.zeros(1, 2, 16, (head_dim + 63) // 64, dtype=torch.int64)
    assert cuda_launch.compress_supported(x, values, bitmaps) is expected


def test_the_cuda_entry_hands_the_scales_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(cuda_launch, "compress_cuda", lambda *args, **kwargs: calls.append((args, kwargs)))
    store = _fp8_store()
    values, bitmaps = store.storage
    x = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    CudaBackend().compress(x, 0.5, values, bitmaps, store.scale_storage)
    assert calls[-1][0][1] is values and calls[-1][1]["scales"] is store.scale_storage
    length = torch.tensor(7)
    CudaBackend().static_evict(x, store, length)
    assert calls[-1][1]["scales"] is store.scale_storage and calls[-1][1]["position"] is length
    plain = BitmapKV.empty(1, 2, 64, 0.5, dtype=torch.float16, capacity=16)
    CudaBackend().static_evict(x, plain, length)
    assert calls[-1][1]["scales"] is None


def test_compress_cuda_refuses_scales_that_do_not_match_the_values():
    store = _fp8_store()
    values, bitmaps = store.storage
    x = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales must be given exactly with float8_e4m3fn values"):
        cuda_launch.compress_cuda(x, values, bitmaps)
    with pytest.raises(ValueError, match="scales must be given exactly with float8_e4m3fn values"):
        cuda_launch.compress_cuda(x, torch.zeros(values.shape, dtype=torch.float16), bitmaps,
                                  scales=store.scale_storage)
    strided = torch.zeros(1, 2, 32, dtype=torch.float16)[:, :, ::2]
    with pytest.raises(ValueError, match="contiguous tokens"):
        cuda_launch.compress_cuda(x, values, bitmaps, scales=strided)
