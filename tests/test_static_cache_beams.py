"""``StaticMustafarCache`` refuses beam search with its documented error, with or without ``batch_size``
(issue 17).

Before issue 17, ``generate(num_beams=2)`` with ``StaticMustafarCache(..., batch_size=1)`` failed with a
shape ``ValueError`` at the prefill (generate repeats the batch for the beams first) instead of the
"cannot reorder ... batch rows (beam search)" error it raises without ``batch_size``.
"""

import pytest
import torch
from helpers import CACHE, generate, prompt, tiny_model

from mustafar import StaticMustafarCache

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]


@pytest.mark.parametrize("batch_size", [None, 1])
def test_beam_search_raises_the_documented_error(batch_size):
    model = tiny_model(seed=1)
    cache = StaticMustafarCache(model.config, batch_size=batch_size, max_tokens=40, window=4)
    with pytest.raises(NotImplementedError, match=r"cannot reorder, select or repeat batch rows \(beam search\)"):
        generate(model, prompt(10), cache, 5, num_beams=2)


def test_repeated_batch_names_num_return_sequences():
    """Sampling with num_return_sequences repeats the batch too: the message says which batch_size fits."""
    model = tiny_model(seed=1)
    cache = StaticMustafarCache(model.config, batch_size=1, max_tokens=40, window=4)
    with pytest.raises(NotImplementedError, match=r"batch_size=3"):
        generate(model, prompt(10), cache, 5, do_sample=True, num_return_sequences=3)


def test_other_batch_mismatch_stays_a_shape_error():
    model = tiny_model(seed=1)
    cache = StaticMustafarCache(model.config, batch_size=2, max_tokens=40, window=4)
    with pytest.raises(ValueError, match=r"key_states must be \[2, 2, n, 16\]"):
        model(prompt(10, batch=3), **{CACHE: cache}, position_ids=torch.arange(10)[None])
