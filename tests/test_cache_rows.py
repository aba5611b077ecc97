"""Batch-row edits of MustafarCache (reorder, select, repeat): checked indices, nothing changed on refusal."""

import pytest
import torch
from helpers import BATCH, assert_unchanged, filled_cache, snapshot, states


@pytest.mark.parametrize("index, error, match", [
    (torch.tensor([True, False, True]), TypeError, r"beam_idx must hold integer batch row indices, got a bool"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"beam_idx must hold integer batch row indices, got dtype.*float32"),
    (torch.tensor([-1, 0]), ValueError, r"beam_idx must hold batch rows in \[0, 3\), got \[-1, 0\]"),
    (torch.tensor([5, 0]), ValueError, r"beam_idx must hold batch rows in \[0, 3\), got \[5, 0\]"),
    (torch.tensor([[0, 1]]), ValueError, r"beam_idx must be a 1-d integer tensor.*got shape \(1, 2\)"),
    (torch.tensor([], dtype=torch.long), ValueError, r"beam_idx must select at least one of the 3 batch rows"),
    ([], ValueError, r"beam_idx must select at least one of the 3 batch rows"),
    ([0.5, 1], TypeError, r"beam_idx must hold integer batch row indices"),
    ("0,1", TypeError, r"beam_idx must be a 1-d integer tensor of batch rows, got str"),
])
def test_reorder_cache_refuses_bad_indices_and_changes_nothing(index, error, match):
    cache = filled_cache()
    before = snapshot(cache)
    with pytest.raises(error, match=match):
        cache.reorder_cache(index)
    assert_unchanged(cache, before)
    with pytest.raises(error, match=match):
        cache.layers[0].reorder_cache(index)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("index, error, match", [
    (torch.tensor([True, False]), ValueError, r"indices, a bool mask, must have one entry per batch row \(3\), got 2"),
    (torch.tensor([False, False, False]), ValueError, r"indices must select at least one of the 3 batch rows"),
    (torch.tensor([7]), ValueError, r"indices must hold batch rows in \[0, 3\), got \[7\]"),
    ([-1], ValueError, r"indices must hold batch rows in \[0, 3\), got \[-1\]"),
    (torch.tensor([[0]]), ValueError, r"indices must be a 1-d integer tensor of batch rows or a 1-d bool mask"),
    (torch.tensor([1.0]), TypeError, r"indices must hold integer batch row indices, got dtype"),
    (1.5, TypeError, r"indices must be a 1-d integer tensor of batch rows or a 1-d bool mask, got float"),
])
def test_batch_select_indices_refuses_bad_indices(index, error, match):
    cache = filled_cache()
    before = snapshot(cache)
    with pytest.raises(error, match=match):
        cache.batch_select_indices(index)
    assert_unchanged(cache, before)


def test_good_indices_still_work_lists_and_masks_included():
    reference = filled_cache()
    rows = [layer.keys.clone() for layer in reference.layers]
    for select, keep in ((lambda c: c.reorder_cache(torch.tensor([2, 0, 2])), [2, 0, 2]),
                         (lambda c: c.reorder_cache([1, 1]), [1, 1]),
                         (lambda c: c.batch_select_indices(torch.tensor([True, False, True])), [0, 2]),
                         (lambda c: c.batch_select_indices([2]), [2])):
        cache = filled_cache()
        for layer, original in zip(cache.layers, reference.layers, strict=True):
            layer.keys = original.keys.clone()
        select(cache)
        for layer, keys in zip(cache.layers, rows, strict=True):
            assert torch.equal(layer.keys, keys[keep]) and layer.pads == [0] * len(keep)
            assert layer.key_store.shape[0] == len(keep)


def test_empty_selection_is_refused_at_the_reorder_and_decoding_goes_on():
    cache = filled_cache(layers=1)
    with pytest.raises(ValueError, match="beam_idx must select at least one"):
        cache.reorder_cache(torch.tensor([], dtype=torch.long))
    cache.update(*states(tokens=1), 0)  # was: ValueError: min() arg is an empty sequence
    assert cache.get_seq_length() == 13


def test_batch_repeat_interleave_checks_repeats():
    cache = filled_cache(layers=1)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        cache.batch_repeat_interleave(0)
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 6


def test_batch_rows_cannot_change_between_update_and_its_attention():
    """Was: accepted, and the attention then read another row's store (NaN with Triton, a silent broadcast in torch)."""
    cache = filled_cache(layers=1)
    new_k, new_v = states(tokens=1)
    cache.update(new_k, new_v, 0)  # not yet read by the attention
    before = snapshot(cache)
    for edit in (lambda: cache.batch_select_indices([1]), lambda: cache.reorder_cache(torch.tensor([2, 1, 0])),
                 lambda: cache.batch_repeat_interleave(2), lambda: cache.layers[0].batch_select_indices([0])):
        with pytest.raises(ValueError, match=r"batch rows cannot be reordered, selected or repeated between update"):
            edit()
        assert_unchanged(cache, before)
    cache.layers[0].consume()
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 2 * BATCH


def test_uint8_indices_are_refused():
    """Was: read as row numbers, where torch indexing (and DynamicCache) once read uint8 as a mask."""
    cache = filled_cache()
    with pytest.raises(TypeError, match=r"indices must be .*got dtype torch.uint8 \(ambiguous"):
        cache.batch_select_indices(torch.tensor([1, 0, 1], dtype=torch.uint8))
