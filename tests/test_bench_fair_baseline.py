"""``mustafar bench`` against the fair dense baseline (issue 14): graph-mode caches, breakdown, chunked prefill."""

import json

import pytest
import torch

import mustafar
from mustafar.bench import run_bench
from mustafar.bench.caches import bookkeeping_op
from mustafar.bench.config import BenchConfig
from mustafar.bench.decode import graph_decode
from mustafar.bench.memory import predict_bytes
from mustafar.bench.models import build_config, build_model, model_dims
from mustafar.generation import make_cache

SMALL = dict(shape="tiny", batches=(1,), prompts=(48,), new_tokens=5, window=8, chunk=16, device="cpu",
             dtype="float32", warmup=False, ttft_repeats=1, op_repeats=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", dtype="float32", device="cpu")


def test_graph_mode_dense_row_is_the_fair_cache(model):
    dense = make_cache(mustafar.parse_setting("dense"), "graph", model=model, batch=2, max_tokens=64)
    assert isinstance(dense, mustafar.DenseStaticCache) and dense.captures_length
    sparse = make_cache(mustafar.parse_setting("K0.7V0.7", window=8), "graph", model=model, batch=2, max_tokens=64,
                        backend="torch")
    assert isinstance(sparse, mustafar.StaticMustafarCache) and not getattr(sparse, "captures_length", False)
    assert isinstance(make_cache(mustafar.parse_setting("dense"), "generate", model=model, batch=2, max_tokens=64),
                      __import__("transformers").DynamicCache)


def test_graph_rows_break_the_step_into_attention_bookkeeping_rest(tmp_path):
    rows = run_bench(out=tmp_path, log=lambda line: None, **{**SMALL, "modes": ("graph",)})["rows"]
    assert [(r["setting"], r["status"]) for r in rows] == [(s, "ok") for s in ("dense", "K0.5V0.5", "K0.7V0.7")]
    for row in rows:
        parts = row["breakdown"]
        assert parts["attention_ms"] > 0 and parts["bookkeeping_ms"] > 0, row  # dense: the in-place write
        assert parts["rest_ms"] == pytest.approx(row["step_ms"] - parts["attention_ms"] - parts["bookkeeping_ms"])
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["config"]["prefill_chunk"] is None


def test_generate_rows_bookkeeping_is_the_compression(tmp_path):
    rows = run_bench(out=None, log=lambda line: None, **{**SMALL, "modes": ("generate",)})["rows"]
    for row in rows:
        parts = row["breakdown"]
        assert parts["bookkeeping_ms"] == parts["compression_ms"]
        assert (parts["bookkeeping_ms"] > 0) == (row["setting"] != "dense")


def test_prefill_chunk_runs_every_mode(tmp_path):
    lines = []
    result = run_bench(out=tmp_path, log=lines.append, **{**SMALL, "prefill_chunk": 16})
    assert all(row["status"] == "ok" for row in result["rows"]) and len(result["rows"]) == 6
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["prefill_chunk"] == 16
    assert any("bookkeeping" in line for line in lines)


def test_graph_decode_tokens_do_not_depend_on_the_prefill_chunk(model):
    prompt = torch.randint(512, (2, 40), generator=torch.Generator().manual_seed(1))
    for setting in ("dense", "K0.0V0.0"):
        parsed = mustafar.parse_setting(setting, window=8)
        caches = [make_cache(parsed, "graph", model=model, batch=2, max_tokens=48, backend="torch") for _ in range(2)]
        whole, _ = graph_decode(model, caches[0], prompt, 6, capture=False)
        chunked, _ = graph_decode(model, caches[1], prompt, 6, capture=False, prefill_chunk=12)
        assert torch.equal(whole, chunked)


def test_bookkeeping_op_of_each_cache(model):
    for setting, expected in (("dense", True), ("K0.5V0.5", True)):
        parsed = mustafar.parse_setting(setting, window=8)
        cache = make_cache(parsed, "graph", model=model, batch=1, max_tokens=32, backend="torch")
        with torch.inference_mode():
            graph_decode(model, cache, torch.randint(512, (1, 20)), 4, capture=False)
        op = bookkeeping_op(cache, parsed, 1, model)
        assert (op is not None) == expected and op.per_step == 1.0
        op.run()
    for setting in ("dense", "K0.5V0.5"):  # DynamicCache, MustafarCache: the compression op serves
        parsed = mustafar.parse_setting(setting)
        cache = make_cache(parsed, "generate", model=model, batch=1, max_tokens=32)
        assert bookkeeping_op(cache, parsed, 1, model) is None


def test_predicted_memory_with_chunks_and_no_repeat_kv():
    dims = model_dims(build_config("llama3-8b"))
    dense = mustafar.parse_setting("dense")
    whole = predict_bytes(dims, dense, "graph", 16, 4096, 32, torch.float16)
    chunked = predict_bytes(dims, dense, "graph", 16, 4096, 32, torch.float16, chunk=512)
    assert chunked["kv"] == whole["kv"] and chunked["prefill"] < whole["prefill"] / 4
    assert whole["decode"] == 2 * 16 * dims["vocab"] * 4  # logits only: the fair dense decode repeats no K/V


def test_predicted_memory_of_a_random_fill_has_no_prefill_activations():
    """``--random-fill`` runs no forward pass: 24 x 32k dense in graph mode on the Llama-3-8B shape is its cache
    (96 GiB) plus a chunk's random K and V, not a one-shot prefill's activations (which an H200 run skipped it
    for: 177 GiB predicted, 2026-12-03); ``generate`` mode's DynamicCache also copies a layer while filling."""
    dims = model_dims(build_config("llama3-8b"))
    dense = mustafar.parse_setting("dense")
    prefilled = predict_bytes(dims, dense, "graph", 24, 32768, 32, torch.float16)
    filled = predict_bytes(dims, dense, "graph", 24, 32768, 32, torch.float16, random_fill=True)
    assert filled["kv"] == prefilled["kv"] and prefilled["total"] > 170 * 2**30
    chunk_states = 2 * 24 * dims["kv_heads"] * 32768 * dims["head_dim"] * 2
    assert filled["prefill"] == 2 * chunk_states and filled["total"] < 105 * 2**30  # 96.1 GiB of KV + 6 GiB
    eager = predict_bytes(dims, dense, "generate", 24, 32768, 32, torch.float16, random_fill=True, chunk=4096)
    layer_kv = 2 * 24 * dims["kv_heads"] * (32768 + 32) * dims["head_dim"] * 2
    assert eager["prefill"] == 2 * chunk_states // 8 + 2 * layer_kv


def test_capacity_probes_prefill_in_chunks(model, monkeypatch):
    from mustafar.bench import capacity

    chunks = []
    real = capacity.first_tokens
    monkeypatch.setattr(capacity, "first_tokens",
                        lambda m, c, ids, chunk=None: chunks.append(chunk) or real(m, c, ids, chunk))
    for setting in ("dense", "K0.7V0.7"):
        parsed = mustafar.parse_setting(setting, window=8)
        probe = capacity.make_probe(model, parsed, "graph", 40, 10**12, steps=2, backend="torch", chunk=16)(3)
        assert probe.fits and probe.batch == 3
    assert chunks == [16, 16]


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_prefill_chunk_must_be_a_positive_int(bad):
    with pytest.raises((TypeError, ValueError), match="prefill_chunk"):
        BenchConfig(prefill_chunk=bad)


def test_cli_prefill_chunk(tmp_path):
    from typer.testing import CliRunner

    from mustafar.cli import app

    args = ["bench", "--shape", "tiny", "--batch", "1", "--prompt", "40", "--new-tokens", "4", "--window", "8",
            "--settings", "dense,K0.7V0.7", "--modes", "graph", "--device", "cpu", "--prefill-chunk", "16",
            "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["config"]["prefill_chunk"] == 16
    assert [(r["setting"], r["status"]) for r in written["rows"]] == [("dense", "ok"), ("K0.7V0.7", "ok")]
    bad = CliRunner().invoke(app, ["bench", "--prefill-chunk", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert bad.exit_code != 0


@pytest.mark.parametrize("start", [1, 2, 9, 10, 11, 12, 40, 5000])
@pytest.mark.parametrize("answer", [0, 1, 10, 37, 5000])
def test_find_max_batch_from_a_start(start, answer):
    from mustafar.bench import Probe, find_max_batch

    best, probes = find_max_batch(lambda batch: Probe(batch, batch <= answer), 5000, start)
    assert best == answer and len({p.batch for p in probes}) == len(probes)
    assert len(probes) <= 2 * (abs(answer - start) + 1).bit_length() + 2
    if answer == start < 5000:
        assert [p.batch for p in probes] == [start, start + 1]


def test_find_max_batch_start_errors():
    from mustafar.bench import Probe, find_max_batch

    for bad in (0, 13, True, 2.0):
        with pytest.raises(ValueError, match="start"):
            find_max_batch(lambda batch: Probe(batch, True), 12, bad)


def test_capacity_search_starts_at_the_prediction(model):
    from mustafar.bench.capacity import predicted_max_batch

    parsed = mustafar.parse_setting("K0.7V0.7", window=8)
    budget = 50 * 2**20
    start = predicted_max_batch(model, parsed, "graph", 40, budget, 2, chunk=16, max_batch=4096)
    dims = model_dims(model.config)
    from mustafar.bench.models import weight_bytes

    need = lambda b: weight_bytes(model) + predict_bytes(dims, parsed, "graph", b, 40, 3, model.dtype,  # noqa: E731
                                                         chunk=16)["total"]
    assert need(start) <= budget < need(start + 1)
    seen = []
    result = run_bench(out=None, log=lambda line: None, probe_factory=lambda s, m, p, b: (
        lambda batch: seen.append(batch) or __import__("mustafar.bench", fromlist=["Probe"]).Probe(batch, batch <= 7)),
        **{**SMALL, "capacity": True, "budget_gib": budget / 2**30, "modes": ("graph",), "settings": ("K0.7V0.7",),
           "prompts": (40,), "prefill_chunk": 16, "capacity_steps": 2})
    row = result["capacity"][0]["settings"]["K0.7V0.7"]
    assert row["max_batch"] == 7 and row["predicted_max_batch"] == start == seen[0]


def test_random_fill_rows(tmp_path):
    lines = []
    rows = run_bench(out=tmp_path, log=lines.append, **{**SMALL, "random_fill": True, "prefill_chunk": 16})["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" and r["ttft_ms"] is None and r["fill"] == "random"
                                  and r["tokens_per_s"] > 0 for r in rows)
    assert any("random fill" in line for line in lines)
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["random_fill"] is True


@pytest.mark.parametrize("mode, setting", [("graph", "dense"), ("graph", "K0.7V0.7"), ("generate", "dense"),
                                           ("generate", "K0.5V0.5")])
def test_fill_random_leaves_a_prefilled_cache(model, mode, setting):
    from mustafar.bench.decode import fill_random

    parsed = mustafar.parse_setting(setting, window=8, chunk=16)
    cache = make_cache(parsed, mode, model=model, batch=2, max_tokens=64, backend="torch")
    prompt = torch.randint(512, (2, 40))
    with torch.inference_mode():
        first = fill_random(model, cache, prompt, chunk=16)
        fresh = make_cache(parsed, mode, model=model, batch=2, max_tokens=64, backend="torch")
        tokens, _ = graph_decode(model, fresh, prompt, 5, capture=False, random_fill=True, prefill_chunk=16)
    assert torch.equal(first, prompt[:, -1:]) and cache.get_seq_length() == 40 and tokens.shape == (2, 5)
    assert all(layer.get_seq_length() == 40 for layer in cache.layers)


def _gpu_runner():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "run_gpu.py"
    spec = importlib.util.spec_from_file_location("run_gpu_fair", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_gpu_fair"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_runner_fair_steps(tmp_path):
    """The runner's steps of issue 14's table: commands the CLI takes; a failed GPU check turns the fusion off."""
    import sys

    import typer

    from mustafar.cli import app

    runner = _gpu_runner()
    args = runner.parse_args(["fair-tests", "e2e-fair", "ttft-fair", "capacity-fair", "--out", str(tmp_path),
                              "--fair-settings", "dense,K0.7V0.7"])
    options = {opt for param in typer.main.get_command(app).commands["bench"].params for opt in param.opts}
    for name in args.steps[1:]:
        command = runner.STEPS[name].command(args)
        assert command[1:4] == ["-m", "mustafar", "bench"] and "--modes" in command
        assert {part for part in command[4:] if part.startswith("--")} <= options, name
    decode = runner.STEPS["e2e-fair"].command(args)
    assert "--random-fill" in decode and decode[decode.index("--settings") + 1] == "dense,K0.7V0.7"
    assert runner.STEPS["fair-tests"].command(args)[-1] == "tests/test_gpu_fair_baseline.py"
    runner.STEPS["fail"] = runner.Step(lambda a: [sys.executable, "-c", "raise SystemExit(1)"], 30,
                                       failure_env=(("MUSTAFAR_FUSED_BOOKKEEPING", "0"),))
    runner.STEPS["show"] = runner.Step(lambda a: [sys.executable, "-c", "import os; print("
                                                  "os.environ.get('MUSTAFAR_FUSED_BOOKKEEPING'))"], 30)
    try:
        assert runner.main(["show", "fail", "show", "--out", str(tmp_path)]) == 1  # duplicates dropped: one show
        assert (tmp_path / "show.log").read_text() == "None\n"
        runner.main(["fail", "show", "--out", str(tmp_path)])
        assert (tmp_path / "show.log").read_text() == "0\n"
    finally:
        runner.STEPS.pop("fail"), runner.STEPS.pop("show")
        sys.modules.pop("run_gpu_fair", None)
