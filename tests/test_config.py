"""Sparsity settings: the frozen dataclass, the ``K0.5V0.7`` names and the registry."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar
from mustafar import SETTINGS, SparsityConfig, parse_setting

SPARSITY = st.floats(0.0, 1.0, exclude_max=True) | st.just(-0.0)


def test_parse_named_setting():
    cfg = parse_setting("K0.5V0.7")
    assert (cfg.key_sparsity, cfg.value_sparsity) == (0.5, 0.7)
    assert (cfg.window, cfg.chunk, cfg.method) == (32, 256, "per-token")
    assert cfg.name == "K0.5V0.7" and not cfg.is_dense
    assert cfg == SparsityConfig(0.5, 0.7)


@pytest.mark.parametrize("name", ["dense", "Dense", " dense ", "K0V0", "K0.0V0.0"])
def test_parse_dense(name):
    cfg = parse_setting(name)
    assert cfg.is_dense and cfg.name == "dense"
    assert (cfg.key_sparsity, cfg.value_sparsity) == (0.0, 0.0)


def test_parse_with_overrides():
    cfg = parse_setting("K0.7V0.7", window=64, chunk=128, method="output-aware")
    fields = (cfg.key_sparsity, cfg.value_sparsity, cfg.window, cfg.chunk, cfg.method)
    assert fields == (0.7, 0.7, 64, 128, "output-aware")


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [("K.5V.25", 0.5, 0.25), ("K0.95V0", 0.95, 0.0), ("K0V0.5", 0.0, 0.5), ("K0.00001V0.123456789", 1e-5, 0.123456789)],
)
def test_parse_number_forms(name, key, value):
    cfg = parse_setting(name)
    assert (cfg.key_sparsity, cfg.value_sparsity) == (key, value)


def test_registry_names_round_trip():
    assert set(SETTINGS) == {"dense", "K0.5V0.5", "K0.7V0.7", "K0.5V0", "K0V0.5", "K0.5V0.5-fp8", "K0.7V0.7-fp8",
                             "K0V0-fp8"}  # the -fp8 rows: issue 15
    for name, cfg in SETTINGS.items():
        assert cfg.name == name
        assert parse_setting(name) == cfg


@settings(deadline=None)
@given(key=SPARSITY, value=SPARSITY)
def test_names_round_trip(key, value):
    cfg = SparsityConfig(key, value)
    again = parse_setting(cfg.name)
    assert (again.key_sparsity, again.value_sparsity) == (cfg.key_sparsity, cfg.value_sparsity)
    assert again.name == cfg.name


def test_frozen_and_hashable():
    cfg = parse_setting("K0.5V0.5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.key_sparsity = 0.7
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 0
    assert hash(cfg) == hash(SparsityConfig(0.5, 0.5))
    assert dataclasses.replace(cfg, value_sparsity=0.7).name == "K0.5V0.7"


def test_ints_become_floats():
    cfg = SparsityConfig(0, 0)
    assert isinstance(cfg.key_sparsity, float) and isinstance(cfg.value_sparsity, float)
    assert cfg.name == "dense"


@pytest.mark.parametrize(
    "name", ["", "foo", "K0.5", "V0.5", "K0.5V", "K0.5 V0.5", "KV", "K-0.1V0.5", "k0.5v0.5", "K0.5V0.5x", "K1e-3V0.5"]
)
def test_parse_bad_name(name):
    with pytest.raises(ValueError, match="setting"):
        parse_setting(name)


@pytest.mark.parametrize(("name", "field"), [("K1V0.5", "key_sparsity"), ("K0.5V1.0", "value_sparsity"),
                                             ("K2.5V0.5", "key_sparsity")])
def test_parse_sparsity_out_of_range(name, field):
    with pytest.raises(ValueError, match=field):
        parse_setting(name)


@pytest.mark.parametrize("name", [0.5, None, b"K0.5V0.5"])
def test_parse_not_a_string(name):
    with pytest.raises(TypeError, match="setting"):
        parse_setting(name)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"key_sparsity": 1.0}, ValueError, "key_sparsity"),
        ({"key_sparsity": -0.5}, ValueError, "key_sparsity"),
        ({"key_sparsity": float("nan")}, ValueError, "key_sparsity"),
        ({"key_sparsity": True}, TypeError, "key_sparsity"),
        ({"value_sparsity": "0.5"}, TypeError, "value_sparsity"),
        ({"value_sparsity": float("inf")}, ValueError, "value_sparsity"),
        ({"window": -1}, ValueError, "window"),
        ({"window": 1.5}, TypeError, "window"),
        ({"chunk": 0}, ValueError, "chunk"),
        ({"chunk": "256"}, TypeError, "chunk"),
        ({"method": "magnitude"}, ValueError, "method"),
    ],
    ids=repr,
)
def test_bad_fields(kwargs, error, field):
    with pytest.raises(error, match=field):
        SparsityConfig(**kwargs)


def test_setting_names_are_ascii():
    for name in ("K０.5V0.5", "K٠.5V0.5"):
        with pytest.raises(ValueError, match="K0.5V0.5"):
            mustafar.parse_setting(name)
    with pytest.raises(TypeError, match="method"):
        mustafar.SparsityConfig(0.5, 0.5, method=["per-token"])


@pytest.mark.parametrize("name,bad", [("K0.5V05", "value_sparsity"), ("K5V0.5", "key_sparsity"), ("K1V0", "key")])
def test_out_of_range_setting_names_the_setting_and_its_form(name, bad):
    """A missing dot ('K0.5V05') reads as sparsity 5: the error names the setting as written and its form."""
    with pytest.raises(ValueError, match=rf"setting '{name}': {bad}.*settings look like 'K0.5V0.5'"):
        parse_setting(name)
