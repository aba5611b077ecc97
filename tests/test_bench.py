"""``mustafar bench`` on the CPU: decode loops, memory model, skip logic, capacity search, outputs, CLI."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StaticCache

import mustafar
from mustafar.bench import BenchConfig, Probe, find_max_batch, generate_decode, graph_decode, run_bench
from mustafar.bench.decode import DecodeStep, first_tokens
from mustafar.bench.memory import predict_bytes
from mustafar.bench.models import build_model, model_dims, weight_bytes
from mustafar.generation import cache_kwargs, kv_bytes, make_cache

SMALL = dict(shape="tiny", batches=(1,), prompts=(48,), new_tokens=4, window=8, chunk=16, device="cpu",
             dtype="float32", warmup=False, ttft_repeats=1, op_repeats=2)
SETTINGS = ("dense", "K0.5V0.5", "K0.7V0.7")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", dtype="float32", device="cpu")


def _prompt(batch, length, seed=0):
    return torch.randint(512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt, new_tokens, cache=None):
    extra = {} if cache is None else cache_kwargs(model, cache)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **extra)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decode_static_cache_equals_generate(model, batch):
    prompt, new = _prompt(batch, 37), 7
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new)
    tokens, timings = graph_decode(model, cache, prompt, new, capture=False)
    assert torch.equal(tokens, _generate(model, prompt, new))
    assert timings.timed_steps == new - 1 - 2 and timings.tokens_per_s > 0 and not timings.captured


def test_graph_decode_static_mustafar_cache_equals_generate(model):
    prompt, new, window = _prompt(2, 40), 6, 8
    cache = mustafar.StaticMustafarCache(model.config, batch_size=2, max_tokens=40 + new, key_sparsity=0.5,
                                         value_sparsity=0.7, window=window, dtype=torch.float32, device="cpu",
                                         backend="torch")
    tokens, _ = graph_decode(model, cache, prompt, new, capture=False)
    reference = mustafar.MustafarCache(0.5, 0.7, window=window, chunk=1, backend="torch")
    assert torch.equal(tokens, _generate(model, prompt, new, reference))


@pytest.mark.parametrize("setting", SETTINGS)
def test_generate_decode_equals_generate(model, setting):
    prompt, new = _prompt(2, 45), 5
    config = mustafar.parse_setting(setting, window=8, chunk=16)
    tokens, timings = generate_decode(model, make_cache(config, "generate", model=model, batch=2, max_tokens=50),
                                      prompt, new)
    assert torch.equal(tokens, _generate(model, prompt, new, make_cache(config, "generate", model=model, batch=2,
                                                                         max_tokens=50)))
    assert timings.timed_steps == new - 1


class _HostSyncs(TorchDispatchMode):
    """Records ops that copy a device value to the host (a CUDA graph cannot capture them)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_host_sync_detector_sees_item():
    with _HostSyncs() as syncs:
        torch.ones(2).sum().item()
    assert syncs.seen


@pytest.mark.parametrize("kind", ["static", "static-mustafar"])
def test_decode_step_reads_nothing_on_the_host(model, kind):
    prompt = _prompt(2, 40)
    if kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=48)
    else:
        cache = mustafar.StaticMustafarCache(model.config, batch_size=2, max_tokens=48, window=8,
                                             dtype=torch.float32, device="cpu", backend="torch")
    with torch.inference_mode():
        step = DecodeStep(model, cache, first_tokens(model, cache, prompt), prompt.shape[1], new_tokens=4)
        with _HostSyncs() as syncs:
            step()
    assert syncs.seen == []


def test_graph_decode_rejects_bad_arguments(model):
    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match="new_tokens"):
        graph_decode(model, cache, _prompt(1, 8), 3)
    with pytest.raises(ValueError, match="prompt_ids"):
        graph_decode(model, cache, torch.zeros(8, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="capture"):
        graph_decode(model, cache, _prompt(1, 8), 8, capture=True)


def test_run_bench_schema(tmp_path):
    result = run_bench(out=tmp_path, log=lambda line: None, command="pytest", **SMALL)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["config"]["shape"] == "tiny" and written["environment"]["command"] == "pytest"
    for key in ("device", "torch", "transformers", "date", "model"):
        assert key in written["environment"]
    rows = written["rows"]
    assert {(r["mode"], r["setting"]) for r in rows} == {(m, s) for m in ("generate", "graph") for s in SETTINGS}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["ttft_ms"] > 0 and row["tokens_per_s"] > 0 and row["timed_steps"] >= 1
        assert set(row["breakdown"]) >= {"attention_ms", "compression_ms", "rest_ms"}
        assert row["breakdown"]["attention_ms"] > 0
        assert (row["breakdown"]["compression_ms"] > 0) == (row["setting"] != "dense")
        assert (row["kv_ratio"] < 1) == (row["setting"] != "dense")
    assert result["rows"] == rows
    assert (tmp_path / "tokens_per_s.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0


def test_skip_logic_with_a_fake_memory_limit(model):
    dims, weights = model_dims(model.config), weight_bytes(model)
    need = {s: predict_bytes(dims, mustafar.parse_setting(s, window=8, chunk=16), "generate", 2, 512, 4,
                             torch.float32)["total"] for s in ("dense", "K0.7V0.7")}
    assert need["K0.7V0.7"] < need["dense"]
    limit = weights + (need["dense"] + need["K0.7V0.7"]) // 2
    rows = run_bench(out=None, log=lambda line: None, **{**SMALL, "batches": (2,), "prompts": (512,),
                     "settings": ("dense", "K0.7V0.7"), "modes": ("generate",), "memory_limit_bytes": limit})["rows"]
    dense, sparse = rows
    assert dense["status"] == "skipped" and dense["reason"].startswith("does not fit (dense): predicted")
    assert sparse["status"] == "ok" and sparse["predicted_bytes"] == need["K0.7V0.7"]


def test_predicted_kv_matches_the_static_caches(model):
    dims, batch, prompt, new = model_dims(model.config), 2, 100, 5
    for setting in ("dense", "K0.5V0.7"):
        config = mustafar.parse_setting(setting, window=8)
        cache = make_cache(config, "graph", model=model, batch=batch, max_tokens=prompt + new)
        with torch.inference_mode():
            first_tokens(model, cache, _prompt(batch, prompt))
        predicted = predict_bytes(dims, config, "graph", batch, prompt, new, torch.float32)["kv"]
        assert predicted == pytest.approx(kv_bytes(cache).held, rel=0.05)


def _fake_probe(weights, per_sequence, budget):
    return lambda batch: Probe(batch, weights + batch * per_sequence <= budget, weights + batch * per_sequence)


@pytest.mark.parametrize("budget", [0, 99, 100, 101, 137, 1000, 4096 * 7 + 100])
def test_find_max_batch_matches_brute_force(budget):
    probe = _fake_probe(100, 7, budget)
    best, probes = find_max_batch(probe, max_batch=5000)
    expected = max([b for b in range(1, 5001) if probe(b).fits], default=0)
    assert best == expected
    assert len(probes) <= 2 * max(1, expected).bit_length() + 2
    assert len({p.batch for p in probes}) == len(probes)


def test_find_max_batch_cap_and_errors():
    assert find_max_batch(lambda b: Probe(b, True), max_batch=12)[0] == 12
    with pytest.raises(ValueError, match="max_batch"):
        find_max_batch(lambda b: Probe(b, True), max_batch=0)


def test_capacity_mode_with_a_fake_memory_model(tmp_path):
    per_sequence = {"dense": 10, "K0.5V0.5": 6, "K0.7V0.7": 4}

    def factory(setting, mode, prompt, budget):
        return _fake_probe(30, per_sequence[setting.name] * prompt // 48, budget)

    result = run_bench(out=tmp_path, log=lambda line: None, probe_factory=factory,
                       **{**SMALL, "capacity": True, "budget_gib": 130 / 2**30, "modes": ("graph",)})
    (row,) = json.loads((tmp_path / "capacity.json").read_text())["capacity"]
    assert row["settings"]["dense"]["max_batch"] == 10 and row["settings"]["K0.7V0.7"]["max_batch"] == 25
    assert row["ratio_to_dense"]["K0.7V0.7"] == 2.5 and row["budget_bytes"] == 130
    assert result["capacity"][0] == row


@pytest.mark.parametrize("bad, name", [({"shape": "gpt5"}, "shape"), ({"batches": (0,)}, "batches"),
                                       ({"modes": ("eager",)}, "modes"), ({"new_tokens": 3}, "new_tokens"),
                                       ({"settings": ("K2V0",)}, "sparsity"), ({"dtype": "int8"}, "dtype"),
                                       ({"budget_gib": -1}, "budget_gib")])
def test_config_errors_name_the_field(bad, name):
    with pytest.raises((TypeError, ValueError), match=name):
        BenchConfig(**bad)


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    from mustafar.bench.report import write_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = []
    written = write_results(tmp_path, {"environment": {}, "config": {}, "rows": []}, lines.append)
    assert written == [tmp_path / "bench.json"] and "matplotlib" in lines[0]


def test_bench_core_runs_without_typer_and_rich():
    """The GPU image has neither: make them unimportable and import the bench core."""
    code = "import sys; sys.modules.update(typer=None, rich=None); from mustafar.bench import run_bench"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_bench(tmp_path):
    from typer.testing import CliRunner

    from mustafar.cli import app

    args = ["bench", "--shape", "tiny", "--batch", "1", "--prompt", "40", "--new-tokens", "4", "--window", "8",
            "--chunk", "16", "--settings", "K0.7V0.7", "--modes", "graph", "--device", "cpu", "--out",
            str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["setting"], r["status"]) for r in rows] == [("K0.7V0.7", "ok")] and "graph" in result.output
    bad = CliRunner().invoke(app, ["bench", "--batch", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "batches" in bad.output


def test_cli_bench_model_too_large_is_one_line(tmp_path, monkeypatch):
    """``mustafar bench --quick`` on a CPU: the 8 B-parameter shape does not fit, and the CLI says so in one line
    (exit 1), not a traceback."""
    from typer.testing import CliRunner

    import mustafar.bench.models as bench_models
    from mustafar.cli import app

    def too_large(config, dtype, device):
        raise MemoryError("the 8.03 B-parameter model needs 29.9 GiB of weights: use a smaller --shape")

    monkeypatch.setattr(bench_models, "_check_weights_fit", too_large)
    result = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("mustafar bench: the 8.03 B-parameter model needs")


@pytest.mark.parametrize("setting", SETTINGS)
def test_capacity_probe_one_sequence_prefill_repeats_the_cache(model, setting, monkeypatch):
    """``prefill="one"``: one prefilled sequence, its cache repeated to the batch, then decode at the batch."""
    from mustafar.bench import capacity

    seen = {}
    real = capacity.make_cache

    def spy(sparsity, mode, *, model, batch, max_tokens, backend="auto"):
        seen["cache"] = real(sparsity, mode, model=model, batch=batch, max_tokens=max_tokens, backend=backend)
        seen["rows"] = batch
        return seen["cache"]

    monkeypatch.setattr(capacity, "make_cache", spy)
    parsed = mustafar.parse_setting(setting, window=8, chunk=16)
    probe = capacity.make_probe(model, parsed, "generate", 40, 10**12, steps=3, backend="torch", prefill="one")(3)
    assert probe.fits and probe.batch == 3 and seen["rows"] == 1
    cache = seen["cache"]
    assert cache.get_seq_length() == 40 + 3 and cache.layers[0].keys.shape[0] == 3
    batch_probe = capacity.make_probe(model, parsed, "generate", 40, 10**12, steps=3, backend="torch",
                                      prefill="batch")(3)
    assert batch_probe.fits and seen["rows"] == 3


def test_capacity_prefill_kind_and_errors():
    from mustafar.bench.capacity import prefill_kind

    assert prefill_kind("generate", "one") == "one" and prefill_kind("graph", "one") == "batch"
    with pytest.raises(ValueError, match=r"prefill must be one of \('one', 'batch'\), got 'all'"):
        prefill_kind("generate", "all")
    with pytest.raises(ValueError, match="capacity_prefill"):
        BenchConfig(capacity_prefill="all")


def test_predict_bytes_one_sequence_prefill_is_smaller():
    setting = mustafar.parse_setting("K0.7V0.7", window=32, chunk=256)
    dims = {"layers": 32, "kv_heads": 8, "q_heads": 32, "head_dim": 128, "hidden": 4096, "intermediate": 14336,
            "vocab": 128256}
    whole = predict_bytes(dims, setting, "generate", 16, 32768, 5)
    one = predict_bytes(dims, setting, "generate", 16, 32768, 5, prefill_batch=1)
    assert one["kv"] == whole["kv"] and one["prefill"] * 8 < whole["prefill"]


def test_capacity_on_cpu_is_the_prediction_without_slack(model, tmp_path):
    """No device memory counters: a batch fits only if predicted within the budget, and the result says so."""
    from mustafar.bench import capacity

    setting = mustafar.parse_setting("dense", window=8, chunk=16)
    weights = weight_bytes(model)
    dims = model_dims(model.config)
    per = lambda b: weights + predict_bytes(dims, setting, "generate", b, 40, 3, model.dtype,  # noqa: E731
                                            prefill_batch=1)["total"]
    budget = (per(5) + per(6)) // 2  # batch 5 is predicted to fit, 6 not; 6 is within the slack
    assert per(6) < budget * 1.25
    best, probes = find_max_batch(capacity.make_probe(model, setting, "generate", 40, budget, steps=3, slack=0.25))
    assert best == 5
    assert all("not measured" in p.reason for p in probes if p.fits)
    result = run_bench(out=tmp_path, log=lambda line: None, **{**SMALL, "capacity": True, "settings": ("dense",),
                                                              "prompts": (40,), "budget_gib": budget / 2**30,
                                                              "modes": ("generate",), "capacity_steps": 3})
    entry = result["capacity"][0]["settings"]["dense"]
    assert entry["measured"] is False and entry["hit_max_batch"] is False
