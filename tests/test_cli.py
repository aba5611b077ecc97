"""The ``mustafar`` command line on a tiny random model saved to a temporary directory."""

import json
import subprocess
import sys

import pytest
from helpers import plain, save_tiny_model
from typer.testing import CliRunner

from mustafar.cli import _eval_config, app
from mustafar.evaluation.texts import load_text

runner = CliRunner()
EVAL_ARGS = ["--context-lengths", "256,320", "--samples", "2", "--ppl-tokens", "24", "--ppl-chunk", "5",
             "--window", "4", "--chunk", "16", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="module")
def eval_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = runner.invoke(app, ["eval", "--model", model_dir, "--out", str(out), *EVAL_ARGS])
    return result, out


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["eval", "--help"]])
def test_help(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "mustafar", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "generate" in done.stdout and "eval" in done.stdout


def test_generate(model_dir):
    args = ["generate", "Hello?", "--model", model_dir, "--max-new-tokens", "40", "--window", "2", "--chunk", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "K0.5V0.5: KV held" in result.output and "tokens/s" in result.output
    streamed = runner.invoke(app, args + ["--stream", "--k-sparsity", "0", "--v-sparsity", "0"])
    assert streamed.exit_code == 0, streamed.output
    assert "dense: KV held" in streamed.output and "ratio 100.0 %" in streamed.output


@pytest.mark.parametrize("args", [["--k-sparsity", "1.0"], ["--v-sparsity", "-0.1"], ["--window", "-1"]])
def test_generate_bad_arguments(model_dir, args):
    result = runner.invoke(app, ["generate", "hi", "--model", model_dir, *args])
    assert result.exit_code == 2


def test_eval_exit_code_and_files(eval_run):
    result, out = eval_run
    assert result.exit_code == 0, result.output
    assert "passkey" in result.output and "ratio" in result.output
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_json_schema(eval_run):
    _, out = eval_run
    doc = json.loads((out / "results.json").read_text())
    assert {"command", "options", "date", "runtime_s", "model_load_s", "model", "versions", "config", "summary",
            "samples"} <= doc.keys()
    assert doc["command"].startswith("mustafar ") and doc["options"]["samples"] == 2
    assert {"mustafar", "torch", "transformers", "python"} <= doc["versions"].keys()
    assert doc["model"]["head_dim"] == 16 and doc["model"]["kv_heads"] == 2
    assert [s["name"] for s in doc["config"]["settings"]] == ["dense", "K0.5V0.5", "K0.7V0.7"]
    assert doc["config"]["tasks"] == ["passkey", "niah", "niah-multikey", "ppl"]
    rows = doc["summary"]
    assert [(r["setting"], r["context_length"]) for r in rows] == [
        (s, n) for s in ("dense", "K0.5V0.5", "K0.7V0.7") for n in (256, 320)]
    for row in rows:
        assert set(row["accuracy"]) == {"passkey", "niah", "niah-multikey"}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["perplexity"] > 1.0
        assert row["ratio"] == 1.0 if row["setting"] == "dense" else 0.3 < row["ratio"] < 1.0
        assert row["kv_bytes"] == pytest.approx(row["ratio"] * row["dense_bytes"], rel=0.2)
    # 3 retrieval tasks x 2 samples + 1 perplexity window, per setting and length
    assert len(doc["samples"]) == 3 * 2 * 7
    retrieval = [s for s in doc["samples"] if s["task"] != "ppl"]
    assert all(isinstance(s["correct"], bool) and s["answer"].isdigit() for s in retrieval)
    scored = [s for s in doc["samples"] if s["task"] == "ppl"]
    assert all(s["scored_tokens"] == 24 and s["nll"] > 0 for s in scored)


def test_eval_sparser_holds_less(eval_run):
    _, out = eval_run
    rows = {(r["setting"], r["context_length"]): r for r in json.loads((out / "results.json").read_text())["summary"]}
    for n in (256, 320):
        assert rows["K0.7V0.7", n]["kv_bytes"] < rows["K0.5V0.5", n]["kv_bytes"] < rows["dense", n]["kv_bytes"]


def test_eval_text_file_and_subset(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("A line of plain English text for the perplexity task. " * 40)
    result = runner.invoke(app, ["eval", "--model", model_dir, "--out", str(tmp_path / "o"), "--tasks", "ppl",
                                 "--settings", "K0.6V0.4", "--text-file", str(text), "--quick", *EVAL_ARGS])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["setting"] for r in doc["summary"]] == ["K0.6V0.4", "K0.6V0.4"]
    assert doc["config"]["text_file"] == str(text) and doc["summary"][0]["accuracy"] == {}


@pytest.mark.parametrize("args, code", [
    (["--settings", "K2V0.5"], 2), (["--settings", "sparse"], 2), (["--tasks", "passkey,trivia"], 2),
    (["--context-lengths", "2k"], 2), (["--context-lengths", "100"], 2), (["--samples", "0"], 2),
    (["--model", "/no/such/model"], 1), (["--text-file", "/no/such/file.txt", "--tasks", "ppl"], 2),
])
def test_eval_bad_arguments(model_dir, tmp_path, args, code):
    base = ["eval", "--model", model_dir, "--out", str(tmp_path), "--no-progress"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == code, result.output


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


@pytest.mark.parametrize("args, option, message", [
    (["--capacity", "--prompts", "8"], "--budget-gib", "needs a budget"),
    (["--capacity", "--budget-gib", "1", "--capacity-prefill", "ONE"], "--capacity-prefill", "must be one of one, batch"),
    (["--settings", "K0.5V0.5,K0.50V0.50"], "", "settings must be distinct"),
])
def test_bench_refuses_bad_capacity_options_up_front(no_cuda, args, option, message, tmp_path):
    result = runner.invoke(app, ["bench", "--shape", "tiny", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert option in plain(result.output) and message in plain(result.output)
