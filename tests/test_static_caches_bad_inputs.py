"""Adversarial inputs to the static caches' ``update`` (QA): clear errors, never an internal one or a wrong store."""

from __future__ import annotations

import pytest
import torch

import mustafar


def test_static_cache_refuses_a_zero_token_update_by_name():
    cache = mustafar.StaticMustafarCache(max_tokens=8)
    empty = torch.randn(1, 2, 0, 4)
    with pytest.raises(ValueError, match="key_states must hold at least one token"):
        cache.update(empty, empty, 0)


def test_dense_static_cache_refuses_integer_states_by_name():
    cache = mustafar.DenseStaticCache(max_tokens=8)
    ints = torch.ones(1, 2, 3, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="key_states must have a dtype in .*torch.int64"):
        cache.update(ints, ints, 0)
