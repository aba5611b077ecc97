"""Weight-only quantisation (issue 14, item 5): a tiny Llama with 4-bit (and 8-bit) torchao weights decodes
with the sparse cache; bad ``weights`` values and a missing torchao give clear errors.

On a CPU, 4-bit weights take torchao's portable ``IntxWeightOnlyConfig`` layout (4-bit values and
per-group scales, dequantised in each matmul); the packed tinygemm layout needs CUDA and bfloat16 and is
exercised by ``mustafar bench --weights int4`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, ReferenceCache, forced_logits, generate, prompt, tiny_model
from transformers import DynamicCache

import mustafar
from mustafar import MustafarCache
from mustafar import weights as weights_module
from mustafar.weights import check_weights, quantize_weights, weight_layout

WINDOW, CHUNK = 4, 4  # small, so that the decode steps below attend to compressed, pruned tokens
NEW = 12


def _quantised(weights: str, seed: int = 0):
    pytest.importorskip("torchao")
    return quantize_weights(tiny_model(seed=seed), weights)


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_int4_weights_hold_4bit_values_per_group():
    original = _linear_weights(tiny_model())
    model = _quantised("int4")
    assert model.config.mustafar_weights == "int4-intx/g64"  # hidden 64: the largest group dividing every input
    for name, weight in _linear_weights(model).items():
        if name == "lm_head":
            assert type(weight) is torch.nn.Parameter and torch.equal(weight, original[name])
            continue
        assert type(weight).__name__ != "Parameter", name
        qdata = weight.qdata
        assert qdata.min() >= -8 and qdata.max() <= 7, name  # the 4-bit grid
        assert len(torch.unique(qdata)) > 4, name
        dequantised = weight.dequantize().float()
        error = (dequantised - original[name]).abs().max()
        scale = original[name].abs().max() / 7
        assert 0 < error <= scale, (name, error, scale)  # really rounded, within one 4-bit step of the largest group


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_quantised_model_sparse_decode_matches_oracle(weights):
    model = _quantised(weights)
    ids = prompt(9, batch=2)
    cache = MustafarCache(0.5, 0.5, WINDOW, CHUNK, backend="torch")
    oracle = ReferenceCache(0.5, 0.5, WINDOW, CHUNK)
    forced = torch.cat([ids, prompt(NEW, batch=2, seed=5)], dim=1)
    sparse, reference = forced_logits(model, cache, forced, 9), forced_logits(model, oracle, forced, 9)
    torch.testing.assert_close(sparse, reference, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == forced.shape[1]

    out = generate(model, ids, MustafarCache(0.5, 0.5, WINDOW, CHUNK, backend="torch"), new=NEW)
    assert out.shape == (2, ids.shape[1] + NEW)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert out.min() >= 0 and out.max() < VOCAB


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_quantised_model_dense_equivalent_at_sparsity_0(weights):
    model = _quantised(weights)
    ids = prompt(9, batch=2, seed=3)
    dense = generate(model, ids, DynamicCache(), new=NEW)
    sparse = generate(model, ids, MustafarCache(0.0, 0.0, WINDOW, CHUNK, backend="torch"), new=NEW)
    assert torch.equal(sparse, dense)


def test_int4_changes_the_logits_more_than_int8():
    ids = prompt(9, seed=4)
    with torch.inference_mode():
        full = tiny_model()(ids).logits
        gaps = {w: (_quantised(w)(ids).logits - full).abs().max() for w in ("int8", "int4")}
    assert 1e-4 < gaps["int8"] < gaps["int4"], gaps  # both really quantised; the 4-bit grid is the coarser


def test_layout_table():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert weight_layout("int4", cuda, torch.bfloat16, [4096, 14336]) == "int4-tinygemm"
    assert weight_layout("int4", cuda, torch.float16, [4096]) == "int4-intx"
    assert weight_layout("int4", cuda, torch.bfloat16, [576]) == "int4-intx"
    assert weight_layout("int4", cpu, torch.bfloat16, [4096]) == "int4-intx"
    assert weight_layout("int8", cuda, torch.float16, [4096]) == "int8"


@pytest.mark.parametrize("bad", ["int3", "INT4", "nf4", "", 4])
def test_unknown_weights_value_names_argument_and_choices(bad):
    with pytest.raises(ValueError, match=r"weights must be None or one of 'int4', 'int8', got ") as info:
        check_weights(bad)
    assert repr(bad) in str(info.value)
    model = tiny_model()
    with pytest.raises(ValueError, match="weights must be"):
        quantize_weights(model, bad)
    with pytest.raises(ValueError, match="weights must be"):
        mustafar.load_model("/nonexistent/never/loaded", weights=bad)  # refused before any loading


def test_none_leaves_model_untouched_without_torchao(monkeypatch):
    monkeypatch.setattr(weights_module.importlib.util, "find_spec", lambda name: None)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_weights(model, None) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_torchao_says_how_to_install(monkeypatch):
    monkeypatch.setattr(weights_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'torchao"):
        quantize_weights(tiny_model(), "int4")


def test_group_size_must_divide_inputs():
    pytest.importorskip("torchao")
    model = tiny_model(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    with pytest.raises(ValueError, match=r"in_features divisible by 32, got 48"):
        quantize_weights(model, "int4")
