"""Every generate() mode with a MustafarCache at sparsity > 0 equals the same mode with the oracle cache (issue 5).

The oracle (:class:`helpers.ReferenceCache`) keeps every token dense and
prunes, at each step, what the rule prunes; so a mode's bookkeeping of the cache
(``reorder_cache``, ``crop``, batch edits, a returned cache) is right iff the
tokens are the same. Contrastive search and DoLa live on the Hub in transformers
5.x (``trust_remote_code``) and are not run here; the batch edits they use are.
"""

import pytest
import torch
from helpers import (
    CACHE,
    ReferenceCache,
    forced_logits,
    generate,
    prompt,
    tiny_model,
)

from mustafar import MustafarCache
from mustafar.attention import _LINKS

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]
SETTING = {"key_sparsity": 0.5, "value_sparsity": 0.7, "window": 4, "chunk": 8}


class CountingCache(MustafarCache):
    """A MustafarCache that records its crops."""

    crops: list

    def crop(self, tokens_to_remove):
        self.__dict__.setdefault("crops", []).append(tokens_to_remove)
        super().crop(tokens_to_remove)


def assistant_of(model, seed=0, noise=0.05):
    """A copy of ``model`` with a perturbed head, so that some of its candidates are rejected."""
    assistant = tiny_model(seed=seed)
    weights = model.state_dict()
    weights["lm_head.weight"] = weights["lm_head.weight"] + noise * torch.randn_like(weights["lm_head.weight"])
    assistant.load_state_dict(weights)
    return assistant


MODES = {
    "greedy": {},
    "sample": {"do_sample": True, "top_k": 20, "temperature": 0.9},
    "beam_search": {"num_beams": 3},
    "beam_sample": {"num_beams": 2, "do_sample": True},
    "num_return_sequences": {"do_sample": True, "num_return_sequences": 3},
    "prompt_lookup": {"prompt_lookup_num_tokens": 3},
    "early_exit_self_speculation": {"assistant_early_exit": 1},
}


#: Speculative modes are lossless (issue 17): their oracle is plain greedy decoding with the oracle cache,
#: whose own multi-token steps prune every query at the block's last boundary.
SPECULATIVE = ("prompt_lookup", "early_exit_self_speculation")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_generate_mode_matches_oracle(mode):
    model = tiny_model(seed=3)
    ids = torch.cat([prompt(20, seed=4)] * 2, dim=1)  # repeats: prompt lookup finds candidates
    outputs = []
    for cache, oracle in ((MustafarCache(**SETTING), False), (ReferenceCache(**SETTING), True)):
        torch.manual_seed(11)
        outputs.append(generate(model, ids, cache, 24, **MODES["greedy" if oracle and mode in SPECULATIVE else mode]))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("window, chunk", [(4, 8), (2, 3)])
def test_assisted_decoding_crops_exactly(window, chunk):
    """Rejected candidates are cropped: under past recording, always from the window, so the crops are exact.

    (Before: a candidate block could move candidates to the store, and their crop truncated it, leaving
    accepted tokens pruned that the rule keeps dense: other tokens than the oracle's.)
    """
    model = tiny_model(seed=3)
    assistant = assistant_of(model, noise=0.5)
    ids = prompt(30, seed=6)
    setting = {**SETTING, "window": window, "chunk": chunk}
    cache = CountingCache(**setting)
    out = generate(model, ids, cache, 30, assistant_model=assistant)
    assert torch.equal(out, generate(model, ids, ReferenceCache(**setting), 30))  # lossless: plain greedy's tokens
    assert cache.record_past and any(n < 0 for n in cache.crops)  # candidates were rejected and cropped
    assert cache.get_seq_length() == out.shape[1] - 1


def test_continue_generation_with_returned_cache():
    model = tiny_model(seed=5)
    first = prompt(26, seed=7)
    caches = MustafarCache(**SETTING), ReferenceCache(**SETTING)
    outs = [generate(model, first, cache, 12) for cache in caches]
    assert torch.equal(*outs)
    follow_up = torch.cat([outs[0], prompt(5, seed=8)], dim=1)  # a user turn appended to the returned ids
    outs = [generate(model, follow_up, cache, 12) for cache in caches]
    assert torch.equal(*outs)
    assert caches[0].get_seq_length() == follow_up.shape[1] + 11


def test_batch_repeat_interleave_and_select_indices():
    """A prompt prefilled once and repeated (what contrastive search and n-best sampling do) equals a repeated batch."""
    model = tiny_model(seed=6)
    ids, steps = prompt(21, seed=9), prompt(12, batch=3, seed=10)
    shared, separate = MustafarCache(**SETTING), MustafarCache(**SETTING)
    with torch.inference_mode():
        model(ids, **{CACHE: shared})
        shared.batch_repeat_interleave(3)
        model(ids.repeat(3, 1), **{CACHE: separate})
        for i in range(steps.shape[1]):
            a = model(steps[:, i:i + 1], **{CACHE: shared}).logits
            b = model(steps[:, i:i + 1], **{CACHE: separate}).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        shared.batch_select_indices(torch.tensor([2, 0]))
        keep = MustafarCache(**SETTING)
        expected = forced_logits(model, keep, torch.cat([ids.repeat(2, 1), steps[[2, 0]], steps[:2, :3]], 1), 21)
        got = [model(steps[:2, i:i + 1], **{CACHE: shared}).logits for i in range(3)]
    torch.testing.assert_close(torch.cat(got, 1), expected[:, -3:], rtol=0, atol=1e-5)


def test_crop_that_needs_pruned_entries_raises_and_changes_nothing():
    model = tiny_model(seed=7)
    cache = MustafarCache(**SETTING)
    generate(model, prompt(30, seed=12), cache, 10)  # 39 tokens: 32 stored, 7 dense
    before = [(layer.stored_tokens, layer.keys.clone()) for layer in cache.layers]
    with pytest.raises(ValueError, match=r"crop\(-8\) would keep 31 .* At most 3 tokens can be removed"):
        cache.crop(-8)
    assert [(layer.stored_tokens, layer.keys.shape) for layer in cache.layers] == [(32, k.shape) for _, k in before]
    assert all(torch.equal(layer.keys, k) for layer, (_, k) in zip(cache.layers, before))
    cache.crop(-3)  # the window keeps `window` = 4 tokens: exact
    assert cache.get_seq_length() == 36
    cache.crop(-36)  # everything: exact
    assert cache.get_seq_length() == 0
    out = generate(model, prompt(30, seed=12), cache, 10)  # starts over like a fresh cache
    assert torch.equal(out, generate(model, prompt(30, seed=12), MustafarCache(**SETTING), 10))


def test_cache_used_by_two_models_raises():
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    cache = MustafarCache(**SETTING)
    out = generate(first, prompt(20), cache, 5)
    with pytest.raises(ValueError, match="read by a second attention module .* a cache serves one model"):
        generate(second, out, cache, 5)
    cache.reset()
    generate(second, prompt(20), cache, 5)  # after reset() it serves another model


def test_offloading_raises():
    model = tiny_model(seed=1)
    cache = MustafarCache(**SETTING)
    generate(model, prompt(20), cache, 3)
    with pytest.raises(NotImplementedError, match="does not support offloading"):
        cache.layers[0].offload()
    cache.offloading = True
    with pytest.raises(NotImplementedError, match="does not support offloading"):
        generate(model, prompt(20), cache, 3)


def test_links_do_not_accumulate():
    """Each update links one tensor to its layer; the links go with the tensors."""
    model = tiny_model(seed=1)
    before = len(_LINKS)
    generate(model, prompt(20), MustafarCache(**SETTING), 40)
    assert len(_LINKS) <= before + 2 * len(model.model.layers)
