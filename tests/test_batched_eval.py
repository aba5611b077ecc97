"""Batched evaluation: every sample's output under batch size N equals its output under batch size 1."""

import tempfile
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, tiny_tokenizer

import mustafar
from mustafar.config import SparsityConfig
from mustafar.evaluation import EvalConfig, ResultStore, run_eval
from mustafar.evaluation.batched import (auto_batch_size, batched_greedy, batched_prefill, fill_batch, left_pad,
                                         length_batches)
from mustafar.evaluation.runner import make_eval_cache

WINDOW, CHUNK = 4, 8
METHODS = ("per-token", "per-channel", "output-aware", "think")


@pytest.fixture(scope="module")
def model():
    with tempfile.TemporaryDirectory() as directory:
        lm, _ = mustafar.load_model(str(save_tiny_model(Path(directory))))
    return lm


def _decode_alone(model, ids, setting, steps):
    batch = left_pad([ids], 0)
    source, logits, queries = batched_prefill(model, batch, WINDOW)
    cache = fill_batch(make_eval_cache(setting, queries, batch.pads), source, batch)
    return batched_greedy(model, cache, logits, batch, [steps])[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ks, vs", [(0.5, 0.5), (0.7, 0.0), (0.0, 0.7)])
def test_padded_rows_decode_as_their_prompt_alone(model, method, ks, vs):
    torch.manual_seed(hash((method, ks, vs)) % 1000)
    lengths, steps = (37, 50, 29, 50), 14  # unequal: rows 0 and 2 padded across chunk boundaries
    prompts = [torch.randint(3, 250, (1, n)) for n in lengths]
    setting = SparsityConfig(ks, vs, WINDOW, CHUNK, method)
    batch = left_pad(prompts, 0)
    assert batch.pads == [13, 0, 21, 0] and batch.attention_mask[0, :13].eq(0).all()
    source, logits, queries = batched_prefill(model, batch, WINDOW, rows_per_forward=3)
    assert sorted(queries) == [0, 1] and queries[0].shape == (4, 4, WINDOW, 16)
    cache = fill_batch(make_eval_cache(setting, queries, batch.pads), source, batch)
    together = batched_greedy(model, cache, logits, batch, [steps] * 4)
    alone = [_decode_alone(model, ids, setting, steps) for ids in prompts]
    assert together == alone
    assert all(len(tokens) == steps for tokens in together)


def test_rows_stop_on_their_own(model):
    prompts = [torch.randint(3, 250, (1, n)) for n in (20, 31)]
    batch = left_pad(prompts, 0)
    source, logits, _ = batched_prefill(model, batch)
    cache = fill_batch(make_eval_cache(SparsityConfig(0.5, 0.5, WINDOW, CHUNK)), source, batch)
    out = batched_greedy(model, cache, logits, batch, [3, 9], stops=[None, lambda t: len(t) == 5])
    assert [len(t) for t in out] == [3, 5]
    with pytest.raises(ValueError, match="one entry per row"):
        batched_greedy(model, cache, logits, batch, [3])


def test_helpers_check_their_input():
    assert length_batches([5, 3, 9, 3], 3) == [[1, 3], [0, 2]]
    assert [len(g) for g in length_batches(list(range(275)), 128)] == [92, 92, 91]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        length_batches([1], 0)
    with pytest.raises(ValueError, match="prompts must be"):
        left_pad([torch.zeros(2, 3, dtype=torch.long)], 0)
    with pytest.raises(ValueError, match="at least one prompt"):
        left_pad([], 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        EvalConfig((SparsityConfig(0, 0),), batch_size=0)


def test_auto_batch_size_is_one_off_cuda(model):
    assert auto_batch_size(model, 8192) == 1


def test_run_eval_batched_equals_unbatched_per_sample(model, tmp_path):
    settings = tuple(mustafar.parse_setting(s, window=WINDOW, chunk=CHUNK)
                     for s in ("dense", "K0.5V0.5", "K0.0V0.7", "K0.7V0.7-fp8"))
    common = dict(tasks=("niah_single_1", "vt", "cwe"), context_lengths=(300,), samples=3, methods=METHODS,
                  max_new_tokens_cap=6)
    one = run_eval(model, tiny_tokenizer(), EvalConfig(settings, batch_size=1, **common), progress=False)
    many = run_eval(model, tiny_tokenizer(), EvalConfig(settings, batch_size=3, **common), progress=False)
    assert len(one) == len(many) == 3 * 3 * (1 + 2 * len(METHODS) + 1)  # FP8: per-token only
    fields = ("key", "output", "score", "correct", "prompt_tokens", "method", "simulated", "references")
    for a, b in zip(one, many):
        assert all(getattr(a, f) == getattr(b, f) for f in fields), (a, b)
        assert b.extra["new_tokens"] == a.extra["new_tokens"]
        assert (b.kv_bytes, b.dense_bytes) == (a.kv_bytes, a.dense_bytes), "the bytes of the prompt alone"


def test_resume_across_batch_sizes(model, tmp_path):
    settings = tuple(mustafar.parse_setting(s, window=WINDOW, chunk=CHUNK) for s in ("dense", "K0.5V0.5"))
    common = dict(tasks=("niah_single_1",), context_lengths=(300,), methods=("per-token",), max_new_tokens_cap=4)
    path = tmp_path / "samples.jsonl"
    first = run_eval(model, tiny_tokenizer(), EvalConfig(settings, samples=2, batch_size=1, **common),
                     progress=False, store=ResultStore(path))
    store = ResultStore(path)
    more = run_eval(model, tiny_tokenizer(), EvalConfig(settings, samples=4, batch_size=4, **common),
                    progress=False, store=store)
    assert [r.to_dict() for r in more[:4]] == [r.to_dict() for r in first]
    assert len(more) == 8 and len(path.read_text().splitlines()) == 8, "finished runs are not run again"
