"""Property tests (hypothesis) of the bitmap format and of the cache's bookkeeping (issue 5).

Format: any shape, dtype and sparsity round-trips to ``prune_per_token``; appending
in any chunking builds the same store as compressing at once. Cache: for random
window, chunk, left padding, update sizes, past recording and crops, no token is
ever lost or reordered, ``get_seq_length`` counts them, the store holds exactly the
pruned oldest tokens, and what the attention reads is the rule of
:mod:`mustafar.cache.rules`, recomputed here from the dense tokens.
"""

import pytest
import torch
from helpers import boundary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mustafar import prune_per_token
from mustafar.cache.layer import MustafarLayer
from mustafar.cache.rules import prune_rows_prefix

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SPARSITY = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)



def prefill_mask(pads, tokens):
    """Bool [b, 1, tokens, tokens]: causal, with each row's first ``pads[row]`` tokens masked."""
    mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).repeat(len(pads), 1, 1, 1)
    for row, p in enumerate(pads):
        mask[row, :, :, :p] = False
    return mask


def check_rule(layer, keys, values):
    """The layer holds ``keys``/``values`` [b, h, t, d] (dense truth) and its attention reads the rule."""
    total, stored = keys.shape[2], layer.stored_tokens
    assert layer.get_seq_length() == total
    bounds = [boundary(total, p, layer.window, layer.chunk) for p in layer.pads]
    assert stored <= min(bounds)
    for tensor, store, window, sparsity in ((keys, layer.key_store, layer.keys, layer.key_sparsity),
                                            (values, layer.value_store, layer.values, layer.value_sparsity)):
        assert torch.equal(store.decompress(), prune_per_token(tensor[:, :, :stored], sparsity))
        assert torch.equal(window, tensor[:, :, stored:])
        read = torch.cat([store.decompress(), prune_rows_prefix(window, [n - stored for n in bounds], sparsity)], 2)
        for row, n in enumerate(bounds):
            x = tensor[row:row + 1]
            assert torch.equal(read[row:row + 1], torch.cat([prune_per_token(x[:, :, :n], sparsity), x[:, :, n:]], 2))


@SETTINGS
@given(window=st.integers(0, 6), chunk=st.integers(1, 7), pads=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       sizes=st.lists(st.integers(1, 9), min_size=1, max_size=10), crops=st.lists(st.integers(0, 12), max_size=10),
       record=st.booleans(), seed=st.integers(0, 2**16))
def test_cache_never_loses_or_reorders_tokens(window, chunk, pads, sizes, crops, record, seed):
    layer = MustafarLayer(0.4, 0.7, window, chunk, record_past=record)
    batch, gen = len(pads), torch.Generator().manual_seed(seed)
    keys = values = torch.zeros(batch, 2, 0, 12)
    for step, n in enumerate(sizes):
        n = n + max(pads) if step == 0 else n  # the prefill holds every row's padding
        k, v = torch.randn(batch, 2, n, 12, generator=gen), torch.randn(batch, 2, n, 12, generator=gen)
        layer.update(k, v)
        layer.consume(None, prefill_mask(pads, n) if step == 0 else None)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        check_rule(layer, keys, values)
        if not record and max(pads) == 0:  # eager, unpadded: the store is exactly the whole chunks of the rule
            assert layer.stored_tokens == boundary(keys.shape[2], 0, window, chunk)
        if step < len(crops) and crops[step]:
            r = min(crops[step], keys.shape[2])
            try:
                layer.crop(-r)
            except ValueError:
                assert not (record and r <= n), "past recording must allow cropping the last update"
            else:
                keys, values = keys[:, :, :keys.shape[2] - r], values[:, :, :values.shape[2] - r]
            check_rule(layer, keys, values)


@SETTINGS
@given(window=st.integers(0, 5), chunk=st.integers(1, 6), before=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       n=st.integers(2, 9), seed=st.integers(0, 2**16), data=st.data())
def test_recorded_update_then_crop_equals_the_kept_tokens_alone(window, chunk, before, n, seed, data):
    """Under past recording, update(n) then crop(-r), r < n, leaves exactly the state of update(n - r)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(1, 1, m, 8, generator=gen) for m in [*before, n]]
    r = data.draw(st.integers(1, n - 1))
    states = []
    for cut in (r, 0):
        layer = MustafarLayer(0.5, 0.5, window, chunk, record_past=True)
        for i, x in enumerate(tokens):
            x = x[:, :, :x.shape[2] - r] if (cut == 0 and i == len(tokens) - 1) else x
            layer.update(x, -x)
            layer.consume()
        if cut:
            layer.crop(-cut)
        states.append(layer)
    cropped, direct = states
    assert cropped.stored_tokens == direct.stored_tokens
    assert torch.equal(cropped.key_store.values, direct.key_store.values)
    assert torch.equal(cropped.key_store.bitmaps, direct.key_store.bitmaps)
    assert torch.equal(cropped.keys, direct.keys) and torch.equal(cropped.values, direct.values)
