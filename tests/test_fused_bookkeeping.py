"""The fused decode bookkeeping and decompress kernels (Triton; the interpreter on a CPU) vs the unfused path."""

from __future__ import annotations

import pytest
import torch

from mustafar import compress
from mustafar.format import expand
from mustafar.backends import triton_available
from mustafar.cache import StaticMustafarLayer

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (a CUDA device or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(max_tokens, key_sparsity, value_sparsity, window):
    return [StaticMustafarLayer(max_tokens, key_sparsity, value_sparsity, window, backend=backend)
            for backend in ("torch", "triton")]


def _feed(layers, keys, values):
    for layer in layers:
        layer.update(keys, values)
        layer._unconsumed = False  # no attention reads these states here


def _state(layer):
    return [layer.keys, layer.values, layer.length, *layer.key_store.storage, *layer.value_store.storage]


CASES = [  # dtype, head_dim, (batch, kv_heads), window, key / value sparsity, max_tokens, prompt
    (torch.float16, 128, (2, 3), 4, 0.7, 0.5, 40, 5),
    (torch.float32, 64, (1, 2), 8, 0.5, 0.0, 30, 1),
    (torch.bfloat16, 80, (3, 1), 1, 0.3, 0.9, 20, 2),
    (torch.float16, 256, (1, 1), 16, 0.5, 0.5, 24, 3),
    (torch.float32, 96, (17, 1), 2, 0.7, 0.7, 9, 4),  # more rows than one program, store filled to capacity
]


@pytest.mark.parametrize("dtype, head_dim, bh, window, s_k, s_v, max_tokens, prompt", CASES)
def test_fused_equals_unfused_bit_for_bit(dtype, head_dim, bh, window, s_k, s_v, max_tokens, prompt):
    torch.manual_seed(head_dim + window)
    reference, fused = _pair(max_tokens, s_k, s_v, window)
    shape = (*bh, prompt, head_dim)
    _feed([reference, fused], torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype))
    assert fused.fused and not reference.fused
    for step in range(max_tokens - prompt):
        keys = torch.randn(*bh, 1, head_dim, device=DEVICE).to(dtype)
        values = torch.randn(*bh, 1, head_dim, device=DEVICE).to(dtype)
        if step % 3 == 1:  # ties among the magnitudes, signed zeros
            keys[..., : head_dim // 2] = 0.5
            values[..., ::2] = -0.0
        _feed([reference, fused], keys, values)
        for a, b in zip(_state(reference), _state(fused)):
            assert torch.equal(a, b)
    assert int(fused.length) == max_tokens and int(fused.counter) == 0


def test_bookkeeping_probe_leaves_the_cache_alone():
    torch.manual_seed(1)
    for layer in _pair(32, 0.5, 0.7, 4):
        _feed([layer], torch.randn(2, 2, 9, 64, device=DEVICE), torch.randn(2, 2, 9, 64, device=DEVICE))
        before = [t.clone() for t in _state(layer)]
        probe = layer.bookkeeping_probe()
        probe()
        probe()
        assert all(torch.equal(a, b) for a, b in zip(before, _state(layer)))


def test_fused_rejects_bad_inputs():
    from mustafar.launch.bookkeeping import fused_bookkeeping

    layer = _pair(16, 0.5, 0.5, 4)[1]
    _feed([layer], torch.randn(1, 2, 5, 64, device=DEVICE), torch.randn(1, 2, 5, 64, device=DEVICE))
    good = torch.randn(1, 2, 1, 64, device=DEVICE)
    stores = (layer.key_store, layer.value_store)
    with pytest.raises(ValueError, match="key_states"):
        fused_bookkeeping(good[:, :1], good, layer.keys, layer.values, *stores, layer.length, layer.counter)
    with pytest.raises(ValueError, match="counter"):
        fused_bookkeeping(good, good, layer.keys, layer.values, *stores, layer.length, layer.length)


@pytest.mark.parametrize("dtype, head_dim, sparsity", [(torch.float16, 128, 0.7), (torch.float32, 80, 0.5),
                                                       (torch.bfloat16, 64, 0.0), (torch.float16, 256, 0.9)])
def test_expand_kernel_equals_reference(dtype, head_dim, sparsity):
    from mustafar.launch.expand import expand_triton

    torch.manual_seed(head_dim)
    store = compress(torch.randn(2, 3, 37, head_dim, device=DEVICE).to(dtype), sparsity)
    values, bitmaps = store.storage
    out = torch.full((2, 3, 40, head_dim), 7.0, dtype=dtype, device=DEVICE)
    expand_triton(values[:, :, :37], bitmaps[:, :, :37], out[:, :, 1:38])
    assert torch.equal(out[:, :, 1:38], expand(values[:, :, :37], bitmaps[:, :, :37], head_dim))
    assert torch.equal(out[:, :, 0], torch.full_like(out[:, :, 0], 7.0))
    with pytest.raises(ValueError, match="bitmaps"):
        expand_triton(values[:, :, :37], bitmaps[:, :, :36], out[:, :, 1:38])


def test_fused_can_be_turned_off(monkeypatch):
    from mustafar.cache.static import FUSED_ENV

    layer = _pair(16, 0.5, 0.5, 4)[1]
    _feed([layer], torch.randn(1, 2, 5, 64, device=DEVICE), torch.randn(1, 2, 5, 64, device=DEVICE))
    assert layer.fused
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not layer.fused


FP8 = torch.float8_e4m3fn


def _use_fused(monkeypatch, env: str, fused: bool) -> None:
    """Let the static cache take the fused Triton paths (``env`` unset) or the unfused ops (``env=0``)."""
    if fused:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, "0")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor, nan_payload: bool = DEVICE == "cpu") -> torch.Tensor:
    """``t`` as integers of its size (signed zeros and NaN payloads compared too), on the CPU.

    e4m3 NaNs (0x7F, 0xFF) read as 0x7F: the reference's clamp leaves the sign of a NaN to vectorisation.
    With ``nan_payload`` False (on a GPU), every NaN of a float tensor reads as one pattern: a GPU's
    fp32 -> fp16/bf16 conversion writes its own canonical NaN, where torch writes 0x7E00 / 0x7FC0.
    """
    t = t.detach().cpu()
    bits = t.view(_INT_OF_SIZE[t.element_size()])
    if t.dtype in (FP8, torch.uint8):
        return torch.where(bits & 0x7F == 0x7F, torch.full_like(bits, 0x7F), bits)
    if not nan_payload and t.is_floating_point():
        return torch.where(torch.isnan(t), torch.full_like(bits, -1), bits)
    return bits


def _fp8_state(layer):
    return [*_state(layer), layer.key_store.scale_storage, layer.value_store.scale_storage]


def _assert_same_bits(reference, fused, where):
    names = ("keys", "values", "length", "key values", "key bitmaps", "value values", "value bitmaps",
             "key scales", "value scales")
    for name, a, b in zip(names, reference, fused):
        assert torch.equal(_bits(a), _bits(b)), f"{name} differ {where}"


def _special_token(kind, shape, dtype):
    """A token ``[*shape, head_dim]`` that stresses the FP8 rule in its first row (the others random)."""
    x = torch.randn(shape).to(dtype)
    finfo, row = torch.finfo(dtype), x.view(-1, shape[-1])[0]
    if kind == "zero":
        row.zero_()
    elif kind == "tiny":  # scale floored at the smallest normal; subnormal inputs
        row.copy_((torch.randn(shape[-1]) * finfo.tiny * 4).to(dtype))
        x.view(-1, shape[-1])[-1] = (torch.randn(shape[-1]) * finfo.tiny / 64).to(dtype)
    elif kind == "inf":  # NaN scale
        row[3] = float("inf")
        x.view(-1, shape[-1])[-1, 0] = -float("inf")
    elif kind == "nan":
        row[1] = float("nan")
    elif kind == "huge":
        row.copy_((torch.randn(shape[-1]).sign() * finfo.max).to(dtype))
    elif kind == "ties":
        row.copy_(torch.randint(-2, 3, (shape[-1],)).to(dtype))
    return x.to(DEVICE)


#: Special tokens fed at decode steps 1, 2, ... (cycled; "random" steps in between).
SPECIAL = ("zero", "random", "tiny", "inf", "random", "nan", "huge", "ties")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_fp8_equals_unfused_bit_for_bit(dtype, head_dim, sparsity):
    """FP8 kept values (issue 15): e4m3 bits, bitmaps and scales of the fused step equal the unfused ops'.

    Window 4, a 2-token prompt (steps before the window fills), then decode to ``max_tokens`` 20: the store's
    capacity (16) is filled to its last row at the last step. Keys at ``sparsity``, values at another.
    """
    torch.manual_seed(head_dim + int(10 * sparsity))
    value_sparsity = {0.0: 0.7, 0.5: 0.0, 0.7: 0.5}[sparsity]
    layers = [StaticMustafarLayer(20, sparsity, value_sparsity, 4, backend=backend, kept_dtype=FP8)
              for backend in ("torch", "triton")]
    bh = (3, 2)
    _feed(layers, torch.randn(*bh, 2, head_dim, device=DEVICE).to(dtype),
          torch.randn(*bh, 2, head_dim, device=DEVICE).to(dtype))
    assert layers[1].fused and not layers[0].fused
    assert layers[1].key_store.capacity == 16 and layers[1].key_store.is_fp8
    for step in range(18):
        kind = SPECIAL[step % len(SPECIAL)]
        keys = _special_token(kind, (*bh, 1, head_dim), dtype)
        values = _special_token(SPECIAL[(step + 3) % len(SPECIAL)], (*bh, 1, head_dim), dtype)
        _feed(layers, keys, values)
        _assert_same_bits(_fp8_state(layers[0]), _fp8_state(layers[1]), f"after step {step} ({kind})")
    assert int(layers[1].length) == 20 and int(layers[1].counter) == 0
    scales = layers[1].key_store.scale_storage
    assert bool(scales.isnan().any()) and bool((scales == 0).any())  # the NaN and the zero rules were exercised
    layers[1].bookkeeping_probe()()  # scratch stores of the layer's kept dtype


@pytest.mark.parametrize("dtype, head_dim, sparsity", [(torch.float16, 128, 0.7), (torch.bfloat16, 80, 0.5),
                                                       (torch.float32, 64, 0.0)])
def test_fused_fp8_eviction_before_at_and_past_capacity(dtype, head_dim, sparsity):
    """Direct launches at chosen lengths: nothing stored before the window fills, store rows 0 .. capacity - 1,
    nothing past capacity; rows the step must leave alone keep their (nonzero) bits, as in the unfused ops."""
    from mustafar.cache.static_ops import static_evict
    from mustafar.format import BitmapKV
    from mustafar.launch.bookkeeping import fused_bookkeeping

    torch.manual_seed(head_dim)
    b, h, w = 2, 3, 4
    stores = [BitmapKV.empty(b, h, head_dim, s, dtype, DEVICE, capacity=16, kept_dtype=FP8) for s in (sparsity, 0.5)]
    for store in stores:  # nonzero junk everywhere, so untouched rows are checked
        values, bitmaps = store.storage
        values.view(torch.uint8).random_(0, 256)
        bitmaps.random_(-2**62, 2**62)
        store.scale_storage.copy_(torch.randn(store.scale_storage.shape))
    rings = [torch.randn(b, h, w, head_dim, device=DEVICE).to(dtype) for _ in range(2)]
    for slot, kind in enumerate(("zero", "inf", "tiny", "huge")):
        rings[0][:, :, slot] = _special_token(kind, (b, h, head_dim), dtype)
        rings[1][:, :, slot] = _special_token(("nan", "ties", "zero", "tiny")[slot], (b, h, head_dim), dtype)
    reference = [t.clone() for t in rings] + [_clone_store(s) for s in stores]
    fused = [t.clone() for t in rings] + [_clone_store(s) for s in stores]
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for held in (0, 3, 4, 5, 10, 19, 20, 23):  # store row held - 4: none, none, 0, 1, 6, 15 (last), none, none
        new_k, new_v = (torch.randn(b, h, 1, head_dim, device=DEVICE).to(dtype) for _ in range(2))
        k_ring, v_ring, k_store, v_store = reference
        length = torch.tensor(held, device=DEVICE)
        static_evict(k_ring, k_store, length, "torch")
        static_evict(v_ring, v_store, length, "torch")
        k_ring[:, :, held % w], v_ring[:, :, held % w] = new_k[:, :, 0], new_v[:, :, 0]
        length = torch.tensor([held], device=DEVICE)
        fused_bookkeeping(new_k, new_v, *fused, length, counter)
        assert int(length) == held + 1 and int(counter) == 0
        want = reference[:2] + [t for s in reference[2:] for t in (*s.storage, s.scale_storage)]
        got = fused[:2] + [t for s in fused[2:] for t in (*s.storage, s.scale_storage)]
        for name, a, c in zip(("key ring", "value ring", "key values", "key bitmaps", "key scales", "value values",
                               "value bitmaps", "value scales"), want, got):
            assert torch.equal(_bits(a), _bits(c)), f"{name} differ at length {held}"


def _clone_store(store):
    from mustafar.format import BitmapKV

    copy = BitmapKV.empty(*store.shape[:2], store.head_dim, store.sparsity, store.dtype, store.values.device,
                          capacity=store.capacity, kept_dtype=store.kept_dtype)
    for dst, src in zip((*copy.storage, copy.scale_storage), (*store.storage, store.scale_storage)):
        dst.copy_(src)
    return copy


def test_fused_rejects_mixed_kept_dtypes():
    from mustafar.format import BitmapKV
    from mustafar.launch.bookkeeping import fused_bookkeeping

    ring = torch.randn(1, 2, 4, 64, device=DEVICE)
    new = torch.randn(1, 2, 1, 64, device=DEVICE)
    fp8 = BitmapKV.empty(1, 2, 64, 0.5, torch.float32, DEVICE, capacity=16, kept_dtype=FP8)
    plain = BitmapKV.empty(1, 2, 64, 0.5, torch.float32, DEVICE, capacity=16)
    length, counter = torch.tensor([4], device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="value_store"):
        fused_bookkeeping(new, new, ring, ring.clone(), fp8, plain, length, counter)
    half = BitmapKV.empty(1, 2, 64, 0.5, torch.float16, DEVICE, capacity=16, kept_dtype=FP8)
    with pytest.raises(ValueError, match="ring's dtype"):
        fused_bookkeeping(new, new, ring, ring.clone(), half, half, length, counter)


def test_static_cache_fp8_decode_stores_equal_the_unfused_path(monkeypatch):
    """A tiny Llama decoding with ``StaticMustafarCache(kept_dtype=FP8)``: fused and unfused stores equal bit for
    bit."""
    import mustafar
    from mustafar.cache.static import FUSED_ENV
    from mustafar.generation import cache_kwargs

    from helpers import tiny_model

    model = tiny_model(dtype=torch.bfloat16, hidden_size=128).to(DEVICE)
    ids = torch.randint(128, (2, 10), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    runs = {}
    for fused in (False, True):
        _use_fused(monkeypatch, FUSED_ENV, fused)
        cache = mustafar.StaticMustafarCache(model.config, batch_size=2, max_tokens=20, key_sparsity=0.7,
                                             value_sparsity=0.5, window=4, backend="triton", kept_dtype=FP8)
        logits = model(ids, **cache_kwargs(model, cache), position_ids=torch.arange(10, device=DEVICE)[None]).logits
        assert all(layer.fused == fused for layer in cache.layers)
        tokens, states = [], []
        for step in range(10):  # to the store's capacity (16 = 20 - window)
            token = logits[:, -1:].argmax(-1) if not fused else runs[False][0][step]
            tokens.append(token)
            position = torch.tensor([[10 + step]], device=DEVICE)
            logits = model(token, **cache_kwargs(model, cache), position_ids=position).logits
            states.append([t.clone() for layer in cache.layers for t in _fp8_state(layer)])
        runs[fused] = (tokens, states, logits)
    for step, (a, b) in enumerate(zip(runs[False][1], runs[True][1])):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(_bits(x), _bits(y)), f"stores differ after decode step {step}"
    assert torch.equal(runs[False][2], runs[True][2])


def test_triton_fp8_compress_of_subnormal_bf16_equals_the_reference():
    """bf16 subnormals widen exactly in the FP8 kernels (the interpreter's bf16 -> fp32 cast does not)."""
    from mustafar.backends import TorchBackend
    from mustafar.format import BitmapKV
    from mustafar.launch.compress import compress_triton

    torch.manual_seed(8)
    tiny = torch.finfo(torch.bfloat16).tiny
    x = (torch.randn(2, 2, 3, 64) * tiny * torch.tensor([4.0, 1.0, 1 / 64]).view(1, 1, 3, 1)).to(torch.bfloat16)
    out = []
    for compress_into in (TorchBackend().compress, compress_triton):
        store = BitmapKV.empty(2, 2, 64, 0.5, torch.bfloat16, DEVICE, capacity=3, kept_dtype=FP8)
        values, bitmaps = store.storage
        compress_into(x.to(DEVICE), 0.5, values[:, :, :3], bitmaps[:, :, :3], store.scale_storage[:, :, :3])
        out.append((*store.storage, store.scale_storage))
    for a, b in zip(*out):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("device_type,env,expected", [("cuda", None, True), ("cuda", "1", True), ("cuda", "0", False),
                                                     ("cpu", "0", True), ("cpu", None, True)])
def test_fp8_stores_on_cuda_take_the_fused_launch_unless_switched_off(monkeypatch, device_type, env, expected):
    """FP8 stores take the fused launch like cache-dtype stores; MUSTAFAR_FUSED_FP8=0 keeps those on a CUDA
    device on the unfused ops (for bisecting); cache-dtype stores are unaffected by it."""
    from types import SimpleNamespace

    from mustafar.cache.static_steps import FUSED_FP8_ENV, StaticSteps

    if env is None:
        monkeypatch.delenv(FUSED_FP8_ENV, raising=False)
    else:
        monkeypatch.setenv(FUSED_FP8_ENV, env)
    keys = torch.zeros(1, 2, 4, 64, dtype=torch.float16)
    layer = SimpleNamespace(is_initialized=True, backend="triton", device=torch.device(device_type), keys=keys,
                            kept_dtype=FP8)
    assert StaticSteps.fused.fget(layer) is expected
    layer.kept_dtype = None
    assert StaticSteps.fused.fget(layer) is True


def _fp8_store_rows(dtype, head_dim, sparsity, tokens=37):
    """An FP8 store ``(values, bitmaps, scales)`` of ``tokens`` rows with zero, NaN, inf, tiny and near-max tokens."""
    from mustafar.format import BitmapKV

    x = torch.randn(2, 3, tokens, head_dim).to(dtype)
    for t, kind in enumerate(("zero", "nan", "inf", "tiny", "huge", "ties", "huge")):
        x[:, :, 3 + 5 * t] = _special_token(kind, (2, 3, head_dim), dtype).cpu()
    store = BitmapKV.empty(2, 3, head_dim, sparsity, dtype, DEVICE, capacity=tokens + 3, kept_dtype=FP8)
    from mustafar.ops import append

    append(store, x.to(DEVICE))
    return store


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_expand_kernel_fp8_equals_expand_store(dtype, head_dim, sparsity):
    """FP8 kept values (issue 15): the kernel dequantises as :func:`expand_store`, bit for bit, on views at a
    token offset into a store: zero scales, NaN scales (NaN at kept channels, 0 at pruned ones), tiny tokens,
    tokens at the dtype's max (the dequantised product passes it: the clamp). NaNs compare as one pattern: the
    reference's NaN payloads vary with torch's vectorisation (0x7E00 and 0x7F80 in one fp16 row, measured)."""
    from mustafar.format import expand_store
    from mustafar.launch.expand import expand_triton

    torch.manual_seed(head_dim + int(10 * sparsity))
    store = _fp8_store_rows(dtype, head_dim, sparsity)
    values, bitmaps = store.storage
    scales = store.scale_storage
    assert bool(scales[:, :, :37].isnan().any()) and bool((scales[:, :, :37] == 0).any())
    rows = slice(2, 35)
    out = torch.full((2, 3, 40, head_dim), 7.0, dtype=dtype, device=DEVICE)
    expand_triton(values[:, :, rows], bitmaps[:, :, rows], out[:, :, 1:34], scales[:, :, rows])
    want = expand_store(values[:, :, rows], bitmaps[:, :, rows], head_dim, scales[:, :, rows])
    assert torch.equal(_bits(out[:, :, 1:34], nan_payload=False), _bits(want, nan_payload=False))
    assert torch.equal(out[:, :, 34:], torch.full_like(out[:, :, 34:], 7.0)) and bool((out[:, :, 0] == 7).all())
    if dtype != torch.float32:  # the near-max token: its largest kept value dequantises to the max, not inf
        huge = out[0, 0, 1 + 3 + 5 * 4 - 2]  # store row 23 (special tokens stress their first (batch, head))
        assert float(huge.abs().max()) == torch.finfo(dtype).max


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_expand_kernel_fp8_arbitrary_bits_and_scales(dtype):
    """Every e4m3 code (NaNs and subnormals included) under scales that are 0, NaN, inf, subnormal, negative or
    large enough that ``448 * scale`` overflows the dtype: the kernel equals :func:`expand_store` bit for bit."""
    from mustafar.format import expand_store
    from mustafar.launch.expand import expand_triton

    torch.manual_seed(3)
    head_dim, tokens = 80, 40
    store = compress(torch.randn(1, 2, tokens, head_dim).to(dtype), 0.5, kept_dtype=FP8)
    values, bitmaps = (t[:, :, :tokens].to(DEVICE) for t in store.storage)
    values.view(torch.uint8).random_(0, 256)
    values.view(torch.uint8)[0, 0, 0, :32] = torch.arange(0, 256, 8, dtype=torch.uint8)
    finfo = torch.finfo(dtype)
    special = torch.tensor([0.0, float("nan"), float("inf"), finfo.tiny / 8, -1.5, finfo.max / 400, finfo.max / 448,
                            finfo.max], dtype=torch.float32)
    scales = torch.randn(1, 2, tokens) * 2.0 ** torch.randint(-20, 20, (1, 2, tokens))
    scales[0, :, :len(special)] = special
    scales = scales.to(dtype).to(DEVICE)
    out = torch.empty(1, 2, tokens, head_dim, dtype=dtype, device=DEVICE)
    expand_triton(values, bitmaps, out, scales)
    want = expand_store(values, bitmaps, head_dim, scales)
    assert torch.equal(_bits(out, nan_payload=False), _bits(want, nan_payload=False))


def test_expand_triton_checks_scales():
    from mustafar.launch.expand import expand_triton

    store = compress(torch.randn(1, 2, 5, 64, dtype=torch.float16), 0.5, kept_dtype=FP8)
    values, bitmaps = (t[:, :, :5].to(DEVICE) for t in store.storage)
    scales = store.scale_storage[:, :, :5].to(DEVICE)
    out = torch.empty(1, 2, 5, 64, dtype=torch.float16, device=DEVICE)
    expand_triton(values, bitmaps, out, scales)  # the good call
    plain = compress(torch.randn(1, 2, 5, 64, dtype=torch.float16), 0.5)
    with pytest.raises(ValueError, match="scales are only for float8_e4m3fn values"):
        expand_triton(*(t[:, :, :5].to(DEVICE) for t in plain.storage), out, scales)
    with pytest.raises(ValueError, match="need scales.*got None"):
        expand_triton(values, bitmaps, out)
    with pytest.raises(ValueError, match=r"scales must be \[1, 2, 5\].*got \(1, 2, 4\)"):
        expand_triton(values, bitmaps, out, scales[:, :, :4])
    with pytest.raises(ValueError, match="scales must be.*torch.float32"):
        expand_triton(values, bitmaps, out, scales.float())
    with pytest.raises(ValueError, match="tokens contiguous"):
        expand_triton(values, bitmaps, out, torch.empty(1, 5, 2, dtype=torch.float16, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="scales must be.*fp16/bf16/fp32"):
        expand_triton(values, bitmaps, out.to(torch.float64), scales.double())


def test_static_cache_fp8_chunked_prefill_triton_equals_torch(monkeypatch):
    """A tiny Llama prefilling in chunks into ``StaticMustafarCache(kept_dtype=FP8, backend="triton")``: each
    chunk's history decompressed by the Triton kernel gives the logits of the PyTorch decompression
    (``MUSTAFAR_FUSED_BOOKKEEPING=0``), exactly; then a few decode steps. On a GPU it verifies the compiled
    kernel (``MUSTAFAR_FUSED_FP8=1`` set here, in case the environment switched it off)."""
    import mustafar
    import mustafar.launch.expand as launch_expand
    from mustafar.cache.static import FUSED_ENV
    from mustafar.cache.static_steps import FUSED_FP8_ENV
    from mustafar.generation import cache_kwargs

    from helpers import tiny_model

    monkeypatch.setenv(FUSED_FP8_ENV, "1")

    model = tiny_model(dtype=torch.bfloat16, hidden_size=128).to(DEVICE)
    ids = torch.randint(128, (2, 34), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    calls = []
    original = launch_expand.expand_triton

    def spy(values, bitmaps, out, scales=None):
        calls.append(scales is not None and values.dtype == FP8)
        original(values, bitmaps, out, scales)

    monkeypatch.setattr(launch_expand, "expand_triton", spy)
    runs = {}
    for fused in (False, True):
        _use_fused(monkeypatch, FUSED_ENV, fused)
        cache = mustafar.StaticMustafarCache(model.config, batch_size=2, max_tokens=40, key_sparsity=0.7,
                                             value_sparsity=0.5, window=4, backend="triton", kept_dtype=FP8)
        logits, start = [], 0
        with torch.no_grad():
            for size in (7, 5, 13, 5, 2, 2):  # chunks 2.. attend to stores of 3, 8, 21, 26 and 28 tokens
                positions = torch.arange(start, start + size, device=DEVICE)[None]
                logits.append(model(ids[:, start:start + size], **cache_kwargs(model, cache),
                                    position_ids=positions).logits)
                start += size
            for _ in range(3):
                token = logits[-1][:, -1:].argmax(-1)
                logits.append(model(token, **cache_kwargs(model, cache),
                                    position_ids=torch.tensor([[start]], device=DEVICE)).logits)
                start += 1
        assert all(layer.fused == fused and layer.key_store.is_fp8 for layer in cache.layers)
        runs[fused] = logits
    assert calls and all(calls)  # only the fused run took the kernel, always with FP8 values and scales
    for step, (a, b) in enumerate(zip(runs[False], runs[True])):
        assert torch.equal(a, b), f"logits differ at step {step}"


@pytest.mark.parametrize("kept_dtype", [None, FP8])
@pytest.mark.parametrize("batch,kv_heads,head_dim", [(1, 8, 128), (3, 2, 64)])
def test_launch_shapes_of_the_bookkeeping_probe_write_what_the_launcher_writes(kept_dtype, batch, kv_heads, head_dim):
    """``benchmarks/probes/bookkeeping_latency.py`` times the kernel with other rows per program, warps and K/V in
    two grid columns (``KV_SPLIT``); each must write the launcher's bytes (two evictions, rings, length)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "probes" / "bookkeeping_latency.py"
    spec = importlib.util.spec_from_file_location("bookkeeping_latency", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    same = probe.check(batch, kv_heads, head_dim, 8, 40, 0.7, torch.float16, kept_dtype, DEVICE)
    assert len(same) == len(probe.VARIANTS) and all(same.values()), same
