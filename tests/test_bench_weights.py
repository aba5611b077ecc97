"""``mustafar bench --weights``: the bench model with torchao weight-only quantisation (issue 14, item 5), on the CPU."""

import json

import pytest
import torch

from mustafar import weights as weights_module
from mustafar.bench import BenchConfig, run_bench
from mustafar.bench.models import build_model, weight_bytes

SMALL = dict(shape="tiny", batches=(1,), prompts=(48,), new_tokens=4, window=8, chunk=16, device="cpu",
             dtype="float32", warmup=False, ttft_repeats=1, op_repeats=2)


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_quantised_bench_model_is_smaller(weights):
    pytest.importorskip("torchao")
    full = weight_bytes(build_model("tiny", dtype="float32", device="cpu"))
    quantised = build_model("tiny", dtype="float32", device="cpu", weights=weights)
    assert quantised.config.mustafar_weights.startswith(weights)
    assert weight_bytes(quantised) < 0.5 * full  # int8 storage (+ scales) instead of fp32, lm_head excepted


def test_run_bench_with_int4_weights(tmp_path):
    pytest.importorskip("torchao")
    run_bench(out=tmp_path, log=lambda line: None, command="pytest", weights="int4",
              settings=("dense", "K0.5V0.5"), **SMALL)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["config"]["weights"] == "int4"
    assert written["environment"]["model"]["quantised"].startswith("int4-intx/g")
    rows = written["rows"]
    assert {(r["mode"], r["setting"]) for r in rows} == {(m, s) for m in ("generate", "graph")
                                                         for s in ("dense", "K0.5V0.5")}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and (row["kv_ratio"] < 1) == (row["setting"] != "dense")


def test_bench_config_rejects_unknown_weights():
    with pytest.raises(ValueError, match=r"weights must be None or one of 'int4', 'int8', got 'nf4'"):
        BenchConfig(**{**SMALL, "weights": "nf4"})


def test_cli_bench_weights_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mustafar.cli import app

    args = ["bench", "--shape", "tiny", "--batch", "1", "--prompt", "40", "--new-tokens", "4", "--device", "cpu",
            "--out", str(tmp_path), "--weights"]
    bad = CliRunner().invoke(app, args + ["int3"])
    assert bad.exit_code == 2 and "weights must be None or one of" in bad.output and "int3" in bad.output
    monkeypatch.setattr(weights_module.importlib.util, "find_spec", lambda name: None)
    missing = CliRunner().invoke(app, args + ["int4"])
    assert missing.exit_code == 2 and "pip install" in missing.output and "torchao" in missing.output
    assert not (tmp_path / "bench.json").exists()
