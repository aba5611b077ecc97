"""Bad inputs to the caches, the model loader and the command line get clear errors (the QA findings 1-11).

Each error is a ``TypeError`` / ``ValueError`` (or ``NotImplementedError`` /
``UnsupportedHardwareError`` where that is the meaning) that names the argument,
the expectation and the value received, raised before any state changes or any
slow work (loading a model) starts.
"""

import pytest
import torch
from hardening_common import CACHE, left_pad, prompt, tiny_model
from tiny_model import save_tiny_model
from typer.testing import CliRunner

import mustafar
import mustafar.models
from mustafar import MustafarCache, StaticMustafarCache
from mustafar.cli import _eval_config, app
from mustafar.evaluation.texts import load_text
from mustafar.ops import UnsupportedHardwareError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
runner = CliRunner()
BATCH, HEADS, DIM = 3, 2, 16


def plain(output: str) -> str:
    """The command's output without rich's box borders and line breaks."""
    return " ".join(output.replace("│", " ").split())


def states(batch=BATCH, heads=HEADS, tokens=5, dim=DIM, dtype=torch.float32, device="cpu"):
    return (torch.randn(batch, heads, tokens, dim, dtype=dtype, device=device),
            torch.randn(batch, heads, tokens, dim, dtype=dtype, device=device))


def filled_cache(layers=2, tokens=12) -> MustafarCache:
    """A cache of ``layers`` layers holding ``tokens`` tokens (some in the store), batch rows 0..2 told apart."""
    cache = MustafarCache(0.5, 0.5, window=2, chunk=4)
    for layer_idx in range(layers):
        cache.update(*states(tokens=tokens), layer_idx)
        cache.layers[layer_idx].consume()
    return cache


def snapshot(cache: MustafarCache):
    return [(layer.keys.clone(), layer.key_store.decompress(), list(layer.pads)) for layer in cache.layers]


def assert_unchanged(cache: MustafarCache, before) -> None:
    for layer, (keys, store, pads) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.key_store.decompress(), store)
        assert layer.pads == pads


# ---------------------------------------------------------------- 1, 2: reorder_cache / batch_select_indices
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


# ---------------------------------------------------------------- 3, 4, 5: update
@pytest.mark.parametrize("value", [
    lambda: torch.randn(BATCH, HEADS, 4, DIM),          # another token count
    lambda: torch.randn(BATCH, HEADS + 1, 5, DIM),      # another head count
    lambda: torch.randn(BATCH, HEADS, 5, DIM).half(),   # another dtype
    lambda: torch.randn(BATCH - 1, HEADS, 5, DIM),      # another batch
], ids=["tokens", "heads", "dtype", "batch"])
def test_first_update_refuses_values_unlike_keys(value):
    cache = MustafarCache(0.5, 0.5, window=2, chunk=4)
    with pytest.raises(ValueError, match=r"value_states must match key_states \[batch, kv_heads, n, head_dim\] "
                                         r"\(3, 2, 5, 16\) torch.float32 on cpu, got"):
        cache.update(torch.randn(BATCH, HEADS, 5, DIM), value(), 0)
    assert cache.get_seq_length() == 0 and not cache.layers[0].is_initialized


def test_later_update_refuses_values_unlike_keys():
    cache = filled_cache(layers=1)
    with pytest.raises(ValueError, match=r"value_states must match key_states.*\(3, 2, 1, 16\).*got \(3, 2, 2, 16\)"):
        cache.update(torch.randn(BATCH, HEADS, 1, DIM), torch.randn(BATCH, HEADS, 2, DIM), 0)
    assert cache.get_seq_length() == 12


def test_update_refuses_states_on_another_device():
    cache = filled_cache(layers=1)
    with pytest.raises(ValueError, match=r"key_states and value_states must be on the device of MustafarCache layer 0, "
                                         r"cpu, got meta"):
        cache.update(*states(tokens=1, device="meta"), 0)
    static = StaticMustafarCache(max_tokens=32, window=4)
    static.update(*states(tokens=6), 0)
    static.layers[0].consume()
    with pytest.raises(ValueError, match=r"must be on the device of StaticMustafarCache layer 0, cpu, got meta"):
        static.update(*states(tokens=1, device="meta"), 0)


@pytest.mark.parametrize("cache", [lambda: MustafarCache(), lambda: StaticMustafarCache(max_tokens=16)],
                         ids=["dynamic", "static"])
@pytest.mark.parametrize("layer_idx, error, match", [
    (-1, ValueError, r"layer_idx must be an int >= 0 \(the model layer\), got -1"),
    (1.0, TypeError, r"layer_idx must be an int >= 0 \(the model layer\), got float 1.0"),
    (True, TypeError, r"layer_idx must be an int >= 0 \(the model layer\), got bool True"),
    ("0", TypeError, r"layer_idx must be an int >= 0 \(the model layer\), got str '0'"),
])
def test_update_refuses_bad_layer_idx(cache, layer_idx, error, match):
    with pytest.raises(error, match=match):
        cache().update(*states(), layer_idx=layer_idx)


# ---------------------------------------------------------------- 6: StaticMustafarCache.crop
def test_static_cache_cannot_crop():
    cache = StaticMustafarCache(max_tokens=16, window=4)
    assert cache.is_croppable is False  # before any layer exists too (transformers' assisted decoding reads it)
    cache.update(*states(tokens=6), 0)
    cache.layers[0].consume()
    assert cache.is_croppable is False and cache.layers[0].is_croppable is False
    for crop in (cache.crop, cache.layers[0].crop):
        with pytest.raises(NotImplementedError, match="StaticMustafarCache cannot crop.*use MustafarCache"):
            crop(-1)
    assert cache.get_seq_length() == 6


def test_static_cache_refuses_batch_row_edits():
    """Was: reorder_cache reordered the dense ring but not the store (a silent wrong answer)."""
    cache = StaticMustafarCache(max_tokens=16, window=2)
    cache.update(*states(tokens=6), 0)
    cache.layers[0].consume()
    ring = cache.layers[0].keys.clone()
    for edit, arg in ((cache.reorder_cache, torch.tensor([2, 1, 0])), (cache.batch_select_indices, torch.tensor([0])),
                      (cache.batch_repeat_interleave, 2)):
        with pytest.raises(NotImplementedError, match="StaticMustafarCache cannot reorder, select or repeat batch"):
            edit(arg)
    assert torch.equal(cache.layers[0].keys, ring)
    empty = StaticMustafarCache(max_tokens=16, window=2)  # no config, no layers yet: refused all the same
    with pytest.raises(NotImplementedError, match="StaticMustafarCache cannot reorder"):
        empty.batch_repeat_interleave(2)


# ---------------------------------------------------------------- 11: backends at construction
@pytest.mark.parametrize("make", [lambda b: MustafarCache(backend=b),
                                  lambda b: StaticMustafarCache(max_tokens=8, backend=b)], ids=["dynamic", "static"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_is_refused_at_construction(monkeypatch, make, backend):
    monkeypatch.setattr(mustafar.ops, "available_backends", lambda: ["torch"])
    with pytest.raises(UnsupportedHardwareError, match=rf"backend='{backend}' cannot run on this machine: it needs "
                                                       r".*available here: \['torch'\]"):
        make(backend)
    assert issubclass(UnsupportedHardwareError, RuntimeError)
    monkeypatch.setattr(mustafar.ops, "available_backends", lambda: ["torch", "triton", "cuda"])
    assert make(backend).backend == backend
    with pytest.raises(ValueError, match="backend must be one of"):
        make("gpu")


# ---------------------------------------------------------------- 10: chunked prefill of a padded batch
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


# ---------------------------------------------------------------- 7, 8: load_model
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


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


# ---------------------------------------------------------------- 7, 9: the command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command loads the model (the checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")
    monkeypatch.setattr(mustafar.models, "load_model", refuse)


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval", "--tasks", "passkey"], ["bench", "--shape", "tiny"]])
@pytest.mark.parametrize("device, message", [("cuda", "needs CUDA"), ("nope", "device must be a torch device name"),
                                             ("meta", "device must hold data")])
def test_cli_refuses_bad_devices_up_front(no_cuda, no_model_load, model_dir, tmp_path, command, device, message):
    extra = ["--out", str(tmp_path)] if command[0] != "generate" else ["--model", model_dir]
    result = runner.invoke(app, [*command, *extra, "--device", device])
    assert result.exit_code == 2, result.output
    assert "--device" in result.output and message in plain(result.output)


@pytest.mark.parametrize("option", ["--settings", "--tasks", "--context-lengths", "--methods"])
def test_eval_refuses_explicitly_empty_lists(no_model_load, model_dir, tmp_path, option):
    result = runner.invoke(app, ["eval", "--model", model_dir, "--out", str(tmp_path), option, ""])
    assert result.exit_code == 2, result.output
    assert "must not be empty" in plain(result.output)


def test_eval_checks_the_text_file_before_loading(no_model_load, model_dir, tmp_path):
    base = ["eval", "--model", model_dir, "--out", str(tmp_path / "out"), "--tasks", "ppl", "--no-progress"]
    result = runner.invoke(app, [*base, "--text-file", str(tmp_path)])
    assert result.exit_code == 2 and "text_file must be a UTF-8 text file, got the directory" in plain(result.output)
    text = tmp_path / "short.txt"
    text.write_text("A short text of plain English words for the perplexity task. " * 4)
    result = runner.invoke(app, [*base, "--text-file", str(text), "--context-lengths", "1024", "--ppl-tokens", "8"])
    assert result.exit_code == 2, result.output
    assert "must hold at least 1024 tokens for a context length of 1024" in plain(result.output)
    with pytest.raises(IsADirectoryError, match="text_file must be a UTF-8 text file, got the directory"):
        load_text(tmp_path)


def test_eval_drops_duplicate_settings_methods_and_lengths():
    config = _eval_config("dense,K0.5V0.5,dense,K0.5V0.5", "passkey,passkey", "256,512,256", None, False, window=4,
                          chunk=16, methods="per-token,think,per-token", ppl_tokens=8, ppl_chunk=4, text_file=None,
                          max_new_tokens_cap=None, data_dir=None, hub=False, seed=0)
    assert [s.name for s in config.settings] == ["dense", "K0.5V0.5"]
    assert config.methods == ("per-token", "think") and config.tasks == ("passkey",)
    assert config.context_lengths == (256, 512)


# ---------------------------------------------------------------- second QA round
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


@pytest.mark.parametrize("device, error, match", [
    ("hpu", UnsupportedHardwareError, r"device 'hpu': no hpu device is available here"),
    ("xla", UnsupportedHardwareError, r"device 'xla': no xla device is available here"),
    ("cpu:3", ValueError, r"device 'cpu:3': the CPU is one device"),
])
def test_check_device_refuses_device_types_this_machine_lacks(device, error, match):
    with pytest.raises(error, match=match):
        mustafar.models.check_device(device)
    assert mustafar.models.check_device("cpu:0") == torch.device("cpu:0")


@pytest.mark.parametrize("args, option, message", [
    (["--capacity", "--prompts", "8"], "--budget-gib", "needs a budget"),
    (["--capacity", "--budget-gib", "1", "--capacity-prefill", "ONE"], "--capacity-prefill", "must be one of one, batch"),
    (["--settings", "K0.5V0.5,K0.50V0.50"], "", "settings must be distinct"),
])
def test_bench_refuses_bad_capacity_options_up_front(no_cuda, args, option, message, tmp_path):
    result = runner.invoke(app, ["bench", "--shape", "tiny", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert option in plain(result.output) and message in plain(result.output)


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "models/org/name"])
def test_a_missing_local_path_says_so(name):
    """Was: Hugging Face's "Repo id must be in the form 'repo_name'" for a path that does not exist."""
    with pytest.raises(FileNotFoundError, match=r"name_or_path: no such file or directory"):
        mustafar.load_model(name)
