"""The first update of an empty layer is its prefill, whatever its length (issue 17, finding 1).

A prefill is attended dense and then stored by the window rule. Before issue 17 a
1-token first update went straight into the store (window 0) and attended to its
own pruned K/V, so a 1-token prompt alone differed from the same prompt as a row
of a left-padded batch (0.10 in the logits at the first step), and a padded row
whose first real update in a chunked prefill held one token differed by 0.24.
"""

import pytest
import torch
from helpers import CACHE, generate, left_pad, prompt, tiny_model
from transformers import DynamicCache

from mustafar import MustafarCache

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]
SETTINGS = {
    "K0.5V0.5-w0c1": {"key_sparsity": 0.5, "value_sparsity": 0.5, "window": 0, "chunk": 1},
    "K0.7V0.6-w0c3": {"key_sparsity": 0.7, "value_sparsity": 0.6, "window": 0, "chunk": 3},
    "default": {},
}
NEW = 8


def logits_of(model, ids, cache, **kwargs):
    """``(tokens [batch, NEW], logits [NEW, batch, vocab])`` of greedy ``generate``."""
    out = generate(model, ids, cache, NEW, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_short_prompt_alone_equals_padded_row(name, length):
    """A 1- or 2-token prompt alone gives what it gives as a row of a left-padded batch."""
    setting = SETTINGS[name]
    model = tiny_model(seed=3)
    short, long = prompt(length, seed=5)[0], prompt(9, seed=6)[0]
    ids, mask = left_pad([long, short])
    batch_tokens, batch_logits = logits_of(model, ids, MustafarCache(**setting), attention_mask=mask)
    alone_tokens, alone_logits = logits_of(model, short[None], MustafarCache(**setting))
    torch.testing.assert_close(alone_logits[:, 0], batch_logits[:, 1], rtol=1e-5, atol=1e-5)
    assert torch.equal(alone_tokens[0], batch_tokens[1])


def test_one_token_prefill_is_dense():
    """The first step of a 1-token prompt reads the token unpruned: the logits of a dense cache."""
    model = tiny_model(seed=4)
    ids = prompt(1, seed=7)
    with torch.inference_mode():
        dense = model(ids, **{CACHE: DynamicCache()}).logits
        cache = MustafarCache(0.7, 0.7, window=0, chunk=1)
        sparse = model(ids, **{CACHE: cache}).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    assert cache.layers[0].stored_tokens == 1  # then stored by the window rule (window 0)


@pytest.mark.parametrize("name", ["K0.5V0.5-w0c1", "K0.7V0.6-w0c3"])
def test_chunked_prefill_row_whose_first_real_update_holds_one_token(name):
    """Chunked prefill of a padded batch: a row whose first chunk is all padding and whose first real update is a
    single token is that prompt's prefill (dense), like the prompt alone."""
    setting = SETTINGS[name]
    model = tiny_model(seed=5)
    short, long = prompt(1, seed=8)[0], prompt(5, seed=9)[0]
    ids, mask = left_pad([long, short])  # row 1: four pads, then its one real token
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = MustafarCache(**setting)
    with torch.inference_mode():
        model(ids[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4], **{CACHE: cache})
        chunked = model(ids[:, 4:], attention_mask=mask, position_ids=positions[:, 4:], **{CACHE: cache}).logits
        alone = model(short[None], **{CACHE: MustafarCache(**setting)}).logits
        dense = model(short[None], **{CACHE: DynamicCache()}).logits
    torch.testing.assert_close(chunked[1:, -1], dense[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1:, -1], alone[:, -1], rtol=1e-5, atol=1e-5)
