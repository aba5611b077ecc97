"""A decode step whose update would be read by another attention than ``"mustafar"`` is refused at that step
(issue 17, finding 3).

Before issue 17: prefill with ``"mustafar"``, switch the model to ``"sdpa"`` for one step, and that step
returned logits off by 0.37 even at sparsity 0 (SDPA saw only the dense window), without an error; the
error came one update later, and the cache then stayed unusable even after switching back.
"""

import pytest
import torch
from helpers import CACHE, generate, prompt, tiny_model
from transformers import DynamicCache

from mustafar import MustafarCache

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]
SETTING = {"key_sparsity": 0.5, "value_sparsity": 0.5, "window": 4, "chunk": 8}


def state(cache):
    return [(layer.get_seq_length(), layer.stored_tokens) for layer in cache.layers]


@pytest.mark.parametrize("setting", [SETTING, {**SETTING, "key_sparsity": 0.0, "value_sparsity": 0.0}],
                         ids=["K0.5V0.5", "sparsity0"])
@torch.inference_mode()
def test_step_under_another_attention_raises_and_the_cache_stays_usable(setting):
    model = tiny_model(seed=3)
    ids = prompt(30, seed=4)
    expected_cache = MustafarCache(**setting)
    model(ids[:, :24], **{CACHE: expected_cache})
    expected = [model(ids[:, i:i + 1], **{CACHE: expected_cache}).logits for i in range(24, 30)]

    cache = MustafarCache(**setting)
    model(ids[:, :24], **{CACHE: cache})
    model(ids[:, 24:25], **{CACHE: cache})
    before = state(cache)
    model.set_attn_implementation("sdpa")
    refused = r"'sdpa'.*unchanged.*set_attn_implementation\(\"mustafar\"\) and run the step again"
    with pytest.raises(ValueError, match=refused):
        model(ids[:, 25:26], **{CACHE: cache})
    assert state(cache) == before  # nothing was added, nothing lost
    with pytest.raises(ValueError, match="'sdpa'"):  # still refused, still unchanged
        model(ids[:, 25:26], **{CACHE: cache})
    assert state(cache) == before
    model.set_attn_implementation("mustafar")  # switching back works: the same step, the same logits
    for i in range(25, 30):
        torch.testing.assert_close(model(ids[:, i:i + 1], **{CACHE: cache}).logits, expected[i - 24],
                                   rtol=0, atol=0)


@torch.inference_mode()
def test_eager_attention_is_refused_too():
    model = tiny_model(seed=5)
    cache = MustafarCache(**SETTING)
    model(prompt(12, seed=6), **{CACHE: cache})
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="'eager'"):
        model(prompt(1, seed=7), **{CACHE: cache})


def test_generate_under_sdpa_refuses_and_says_to_reset():
    """A prefill read by another attention: the cache never saw the mask; the message says to reset."""
    model = tiny_model(seed=6)
    model.set_attn_implementation("sdpa")
    cache = MustafarCache(**SETTING)
    ids = prompt(20, seed=8)
    with pytest.raises(ValueError, match=r"cache\.reset\(\)"):
        generate(model, ids, cache, 5)
    cache.reset()  # then it works under "mustafar"
    model.set_attn_implementation("mustafar")
    out = generate(model, ids, cache, 5)
    assert torch.equal(out, generate(model, ids, MustafarCache(**SETTING), 5))


@torch.inference_mode()
def test_sparsity_zero_step_read_by_mustafar_equals_dense():
    """Control: the check never refuses the ``"mustafar"`` reader (sparsity 0 equals DynamicCache)."""
    model = tiny_model(seed=7)
    ids = prompt(20, seed=9)
    caches = MustafarCache(0.0, 0.0, window=2, chunk=3), DynamicCache()
    outs = [[model(ids[:, :12], **{CACHE: c}).logits[:, -1]] for c in caches]
    for out, c in zip(outs, caches):
        out += [model(ids[:, i:i + 1], **{CACHE: c}).logits[:, -1] for i in range(12, 20)]
    torch.testing.assert_close(torch.stack(outs[0]), torch.stack(outs[1]), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_static_cache_refuses_a_step_under_another_attention():
    from mustafar import StaticMustafarCache

    model = tiny_model(seed=8)
    ids = prompt(14, seed=10)
    cache = StaticMustafarCache(model.config, max_tokens=32, window=4)
    model(ids[:, :12], **{CACHE: cache}, position_ids=torch.arange(12)[None])
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="StaticMustafarCache layer 0: .*'sdpa'.*unchanged"):
        model(ids[:, 12:13], **{CACHE: cache}, position_ids=torch.tensor([[12]]))
    assert cache.get_seq_length() == 12
    model.set_attn_implementation("mustafar")
    logits = model(ids[:, 12:13], **{CACHE: cache}, position_ids=torch.tensor([[12]])).logits
    expected = StaticMustafarCache(model.config, max_tokens=32, window=4)
    model(ids[:, :12], **{CACHE: expected}, position_ids=torch.arange(12)[None])
    torch.testing.assert_close(logits, model(ids[:, 12:13], **{CACHE: expected},
                                             position_ids=torch.tensor([[12]])).logits, rtol=0, atol=0)
