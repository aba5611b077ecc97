"""benchmarks/eval_study.py at tiny size (tiny random model): outputs, intervals, resume, budget, docs generator."""

import importlib.util
import json
import pathlib

import pytest
from helpers import save_tiny_model

from mustafar.evaluation.study import data_sections, update_sections

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _load("eval_study", _ROOT / "benchmarks" / "eval_study.py")
docs = _load("make_study_docs", _ROOT / "docs" / "evaluation" / "make_study_docs.py")
TINY = ["--smoke", "--device", "cpu", "--lengths", "300", "--ppl-length", "300", "--window", "4", "--chunk", "16",
        "--max-new-tokens", "3", "--report-every", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert study.main(["--model", model_dir, "--out", str(out), *TINY]) == 0
    return out


def test_smoke_outputs(run, capsys):
    document = json.loads((run / "study.json").read_text())
    assert document["complete"] and document["runs"] == document["total"] == 2 * 2 * 3 + 3
    ruler = [r for r in document["summary"] if r["suites"]]
    assert [(r["method"], r["setting"]) for r in ruler] == [("dense", "dense"), ("per-token", "K0.5V0.5"),
                                                            ("think", "K0.5V0.5")]
    for row in ruler:
        low, high = row["suites_ci"]["ruler"]
        assert 0 <= low <= row["suites"]["ruler"] <= high <= 1 and high - low > 0
        assert row["task_samples"] == {"niah_single_1": 2, "vt": 2}
    assert [r["perplexity"] is not None for r in document["summary"]].count(True) == 3
    names = {(c["comparison"], c["method"]) for c in document["comparisons"]}
    assert {("vs dense", "per-token"), ("vs dense", "think"), ("per-token vs think", "per-token")} <= names
    assert all({"delta", "ci95", "discordant", "samples"} <= set(c) for c in document["comparisons"])
    assert {"ruler-300.png", "ppl.png", "tables.md", "samples.jsonl"} <= {p.name for p in run.iterdir()}
    assert "RULER @ 300 (95 % CI)" in (run / "tables.md").read_text()


def test_resume_runs_nothing_again(run, model_dir, capsys):
    lines = len((run / "samples.jsonl").read_text().splitlines())
    assert study.main(["--model", model_dir, "--out", str(run), *TINY]) == 0
    assert len((run / "samples.jsonl").read_text().splitlines()) == lines
    assert json.loads((run / "study.json").read_text())["resumed"] == lines


def test_time_budget_stops_and_resumes(model_dir, tmp_path, capsys):
    args = ["--model", model_dir, "--out", str(tmp_path), *TINY]
    assert study.main(args + ["--time-budget-s", "0"]) == 0
    first = json.loads((tmp_path / "study.json").read_text())
    assert not first["complete"] and 0 < first["runs"] < first["total"]
    assert "run the same command again to resume" in capsys.readouterr().out
    assert study.main(args) == 0
    final = json.loads((tmp_path / "study.json").read_text())
    assert final["complete"]
    # both invocations are recorded, and their run times add up
    runs = [i["runs_done"] for i in final["invocations"]]
    assert runs == [first["runs"], final["total"] - first["runs"]]
    assert final["runtime_total_s"] == pytest.approx(sum(i["runtime_s"] for i in final["invocations"]))
    setup = data_sections(final)["setup"]
    assert "in 2 invocations" in setup and "Command 1 (" in setup and "Command 2 (" in setup
    assert setup.count("- Tasks: ") == 2  # the perplexity run and the RULER run


def test_plan_estimates_without_running(model_dir, tmp_path, capsys):
    assert study.main(["--model", model_dir, "--out", str(tmp_path), "--plan", *TINY]) == 0
    out = capsys.readouterr().out
    assert '"prompts": 4' in out and '"batches": 1' in out and "estimate_s" in out
    assert not (tmp_path / "samples.jsonl").exists()


def test_bad_arguments():
    with pytest.raises(SystemExit):
        study.parse_args(["--samples", "0"])
    with pytest.raises(SystemExit, match="--settings"):
        study.configs(study.parse_args(["--settings", "dense,K9V9"]))


def test_docs_generator_fills_only_the_marked_sections(run, tmp_path):
    doc = tmp_path / "EVALUATION.md"
    names = ("setup", "headline", "comparisons", "per-task", "plots")
    doc.write_text("prose before\n" + "".join(f"<!-- study:{n}:begin -->\nold\n<!-- study:{n}:end -->\nkept {n}\n"
                                               for n in names))
    assert docs.main([str(run / "study.json"), "--out-dir", str(tmp_path / "out"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.startswith("prose before") and all(f"kept {n}" in text for n in names)
    assert "RULER @ 300 (95 % CI)" in text and "vs dense" in text and "out/ruler-300.png" in text
    assert (tmp_path / "out" / "study.json").exists() and (tmp_path / "out" / "ppl.png").exists()
    with pytest.raises(ValueError, match="study:setup:begin"):
        update_sections("no markers", {"setup": "x"})
