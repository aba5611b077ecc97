"""Left-padded batches: each row of a padded batch is decoded exactly as its prompt alone (issue 5).

The rule (:mod:`mustafar.cache.rules`) counts a row's boundary from its own real
tokens, so padding never changes which tokens of a prompt are pruned, nor what
pruning keeps of them; at sparsity 0 a row equals dense decoding too.
"""

import pytest
import torch
from helpers import CACHE, ReferenceCache, generate, left_pad, prompt, tiny_model
from transformers import DynamicCache, Qwen2Config

from mustafar import MustafarCache, prune_per_token
from mustafar.cache.layer import MustafarLayer
from mustafar.cache.rules import pads_from_mask
from mustafar.reference import decode_attention_reference

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]
LENGTHS = (50, 37, 21, 6)  # pads 0, 13, 29, 44: inside, across and beyond whole chunks


def padded_vs_alone(model, setting, new=20, lengths=LENGTHS, **kwargs):
    rows = [prompt(n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    kw = {"return_dict_in_generate": True, "output_logits": True, **kwargs}
    batch = generate(model, ids, MustafarCache(**setting), new, attention_mask=mask, **kw)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], MustafarCache(**setting), new, **kw)
        per_row = batch.sequences.shape[0] // len(rows)
        assert torch.equal(batch.sequences[i * per_row:(i + 1) * per_row, ids.shape[1]:],
                           alone.sequences[:, row.numel():]), f"row {i} ({row.numel()} tokens)"
        if "num_beams" not in kwargs:
            logits = torch.stack([step[i] for step in batch.logits])
            torch.testing.assert_close(logits, torch.stack([step[0] for step in alone.logits]), rtol=1e-4, atol=1e-4)
    return ids, mask, batch


@pytest.mark.parametrize("setting", [
    {"key_sparsity": 0.5, "value_sparsity": 0.7, "window": 4, "chunk": 8},
    {"key_sparsity": 0.7, "value_sparsity": 0.3, "window": 9, "chunk": 5},
    {"key_sparsity": 0.6, "value_sparsity": 0.6, "window": 0, "chunk": 1},
    {"key_sparsity": 0.0, "value_sparsity": 0.0, "window": 4, "chunk": 8},
], ids=["K0.5V0.7-w4c8", "K0.7V0.3-w9c5", "K0.6V0.6-w0c1", "dense-w4c8"])
def test_padded_rows_equal_each_prompt_alone(setting):
    model = tiny_model(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=128, initializer_range=0.2), seed=7)
    ids, mask, batch = padded_vs_alone(model, setting)
    if setting["key_sparsity"] == 0.0:
        dense = generate(model, ids, DynamicCache(), 20, attention_mask=mask)
        assert torch.equal(batch.sequences, dense)


def test_padded_beam_search_equals_alone():
    """Beams of padded rows: ``reorder_cache`` carries each row's padding along."""
    setting = {"key_sparsity": 0.5, "value_sparsity": 0.5, "window": 3, "chunk": 4}
    padded_vs_alone(tiny_model(seed=8), setting, new=12, lengths=(30, 17), num_beams=3)


def test_padded_batch_matches_oracle_with_its_pads():
    setting = {"key_sparsity": 0.5, "value_sparsity": 0.7, "window": 4, "chunk": 8}
    model = tiny_model(seed=9)
    ids, mask = left_pad([prompt(n, seed=30 + n)[0] for n in (40, 23)])
    out = generate(model, ids, MustafarCache(**setting), 16, attention_mask=mask)
    assert torch.equal(out, generate(model, ids, ReferenceCache(**setting, pads=[0, 17]), 16, attention_mask=mask))


def test_pads_read_from_the_prefill_mask():
    model = tiny_model(seed=1)
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (20, 11, 3)])
    cache = MustafarCache(0.5, 0.5, window=2, chunk=4)
    with torch.inference_mode():
        model(ids, attention_mask=mask, **{CACHE: cache})
    assert [layer.pads for layer in cache.layers] == [[0, 9, 17]] * 2
    assert [layer.stored_tokens for layer in cache.layers] == [16, 16]  # min over rows of 0+16, 9+8, 17+0


def test_inner_padding_stays_masked():
    """Masked tokens after a row's first real token (a pad id inside a prompt) are masked, and count as tokens."""
    model = tiny_model(seed=2)
    ids = prompt(30, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, 10:13] = 0, 0
    dense = generate(model, ids, DynamicCache(), 12, attention_mask=mask)
    assert torch.equal(generate(model, ids, MustafarCache(0.0, 0.0, window=3, chunk=4), 12, attention_mask=mask), dense)
    setting = {"key_sparsity": 0.5, "value_sparsity": 0.5, "window": 3, "chunk": 4}
    cache = MustafarCache(**setting)
    out = generate(model, ids, cache, 12, attention_mask=mask)
    assert cache.layers[0].pads == [4, 0]
    assert torch.equal(out, generate(model, ids, ReferenceCache(**setting, pads=[4, 0]), 12, attention_mask=mask))


def test_pads_from_float_and_broadcast_masks():
    bool_mask = torch.tril(torch.ones(5, 5, dtype=torch.bool)).expand(2, 1, 5, 5).clone()
    bool_mask[1, :, :, :2] = False
    additive = torch.zeros(2, 1, 5, 7).masked_fill(~torch.nn.functional.pad(bool_mask, (0, 2), value=True), -torch.inf)
    assert pads_from_mask(bool_mask, 2, 5) == [0, 2] == pads_from_mask(additive, 2, 5)
    assert pads_from_mask(bool_mask[:1], 3, 5) == [0, 0, 0] and pads_from_mask(None, 2, 5) == [0, 0]
    bool_mask[0, :, :, 3] = False  # a masked token after the first real one: not padding
    assert pads_from_mask(bool_mask, 2, 5) == [0, 2]
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch=2 or 1, heads, q_len=4"):
        pads_from_mask(bool_mask, 2, 4)


def test_layer_prunes_lagging_window_tokens_per_row():
    """Rows whose boundary lies past the store have those window tokens pruned by the attention."""
    layer = MustafarLayer(0.5, 0.5, window=2, chunk=4)
    k, v = torch.randn(2, 1, 12, 8), torch.randn(2, 1, 12, 8)
    layer.update(k, v)
    mask = torch.tril(torch.ones(12, 12, dtype=torch.bool)).expand(2, 1, 12, 12).clone()
    mask[1, :, :, :5] = False
    layer.consume(None, mask)
    assert layer.pads == [0, 5] and layer.stored_tokens == 8  # rows' boundaries: 8 and 5 + 4
    query, scale = torch.randn(2, 2, 1, 8), 0.35
    k1, v1 = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8)
    key, value = layer.update(k1, v1)
    layer.consume()
    out = layer.attend(query, key, value, scale, None)
    keys, values = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    assert layer.stored_tokens == 8  # row 1's 9th token is in the window, attended pruned
    for row, boundary in ((0, 8), (1, 9)):
        kr = torch.cat([prune_per_token(keys[row:row + 1, :, :boundary], 0.5), keys[row:row + 1, :, boundary:]], 2)
        vr = torch.cat([prune_per_token(values[row:row + 1, :, :boundary], 0.5), values[row:row + 1, :, boundary:]], 2)
        expected = decode_attention_reference(query[row:row + 1], kr, vr, scale)
        torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", [{"window": 4, "chunk": 8}, {"window": 8, "chunk": 32}], ids=["w4c8", "w8c32"])
@pytest.mark.parametrize("chunks, real", [([10, 40], [30]), ([5, 5, 40], [30]), ([10, 12, 28], [2, 28])])
def test_chunked_prefill_of_a_padded_row_equals_its_prompt_alone(setting, chunks, real):
    """A row whose first chunks are all padding (20 pads) is pruned as its 30-token prompt alone, chunked as its
    real tokens arrive; the unpadded row as itself alone in the same chunks."""
    setting = {"key_sparsity": 0.5, "value_sparsity": 0.6, **setting}
    model = tiny_model(seed=3)
    short, long = prompt(30, seed=5)[0], prompt(50, seed=6)[0]
    ids, mask = left_pad([short, long])
    cache = MustafarCache(**setting)
    batch = chunked_logits(model, ids, mask, cache, chunks)
    assert [layer.pads for layer in cache.layers] == [[20, 0]] * 2  # was [[10, 0]] * 2 for chunks [10, 40]
    alone = chunked_logits(model, short[None], torch.ones(1, 30, dtype=torch.long), MustafarCache(**setting), real)
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-4, atol=1e-4)
    alone = chunked_logits(model, long[None], torch.ones(1, 50, dtype=torch.long), MustafarCache(**setting), chunks)
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def chunked_logits(model, ids, mask, cache, chunks, new=8):
    """Prefill ``ids`` in ``chunks``, then ``new`` greedy steps; logits ``[batch, new + 1, vocab]``."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    start = 0
    for n in chunks:
        out = model(ids[:, start:start + n], attention_mask=mask[:, :start + n],
                    position_ids=positions[:, start:start + n], **{CACHE: cache})
        start += n
    logits = [out.logits[:, -1].float()]
    for _ in range(new):
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        out = model(token, attention_mask=mask, position_ids=positions[:, -1:], **{CACHE: cache})
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)
