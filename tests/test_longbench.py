"""LongBench: local JSONL data, prompts, middle truncation, jobs, and `mustafar eval --tasks longbench` (+ resume)."""

import json

import pytest
from helpers import save_tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from mustafar.cli import app
from mustafar.evaluation.jobs import Job, longbench_jobs
from mustafar.evaluation.longbench import (
    MAX_NEW_TOKENS,
    NO_CHAT_TASKS,
    PROMPTS,
    available_tasks,
    build_input_ids,
    build_prompt,
    load_longbench,
    truncate_middle,
)

REQUIRED = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
            "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]


def _record(task: str, i: int, context: str = "") -> dict:
    answers = {"trec": ["Location"], "passage_retrieval_en": ["Paragraph 2"], "passage_count": ["3"],
               "lcc": ["return x"], "repobench-p": ["return y"]}.get(task, [f"answer {i}", "other"])
    classes = ["Location", "Entity", "Human being"] if task == "trec" else None
    return {"input": f"Question {i} about Zürich?", "context": context or f"Context {i}. " * 30, "answers": answers,
            "length": 60, "dataset": task, "language": "en", "all_classes": classes, "_id": f"id{i}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("longbench")
    for task in ("hotpotqa", "trec", "lcc", "passage_retrieval_en"):
        lines = [json.dumps(_record(task, i), ensure_ascii=False) for i in range(3)]
        (directory / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_task_table_covers_the_required_tasks():
    assert set(REQUIRED) <= set(PROMPTS) and set(REQUIRED) <= set(MAX_NEW_TOKENS)
    assert all("{context}" in PROMPTS[t] for t in REQUIRED)
    assert MAX_NEW_TOKENS["gov_report"] == 512 and MAX_NEW_TOKENS["hotpotqa"] == 32 and MAX_NEW_TOKENS["lcc"] == 64


def test_load_local_jsonl(data_dir):
    assert available_tasks(data_dir) == ["hotpotqa", "trec", "passage_retrieval_en", "lcc"]
    records = load_longbench("hotpotqa", data_dir)
    assert len(records) == 3 and records[1]["input"] == "Question 1 about Zürich?"
    assert len(load_longbench("hotpotqa", data_dir, limit=2)) == 2


def test_load_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
        load_longbench("qasper", data_dir)
    with pytest.raises(ValueError, match="task"):
        load_longbench("nosuchtask", data_dir)
    with pytest.raises(ValueError, match="data_dir"):
        load_longbench("hotpotqa")
    (tmp_path / "hotpotqa.jsonl").write_text('{"context": "c", "input": "q", "answers": []}\n')
    with pytest.raises(ValueError, match=r"hotpotqa.jsonl:1: answers"):
        load_longbench("hotpotqa", tmp_path)
    (tmp_path / "hotpotqa.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"hotpotqa.jsonl:1 must be one JSON object"):
        load_longbench("hotpotqa", tmp_path)


def test_build_prompt_fills_the_template():
    record = _record("hotpotqa", 0, context="Passage {not a field}.")
    prompt = build_prompt("hotpotqa", record)
    assert "Passage {not a field}." in prompt and prompt.endswith("Question: Question 0 about Zürich?\nAnswer:")


def test_truncate_middle_keeps_first_and_last_halves():
    tokenizer = tiny_tokenizer()  # one token per byte
    assert truncate_middle(tokenizer, "abcdefghij", 4) == "abij"
    assert truncate_middle(tokenizer, "abcdefghij", 5) == "abij"  # int(5 / 2) = 2 tokens each side
    assert truncate_middle(tokenizer, "abcdefghij", 10) == "abcdefghij"
    assert truncate_middle(tokenizer, "héllo wörld", 6) == "hé" + "rld"  # "é" is 2 bytes: 3 tokens each side
    with pytest.raises(ValueError, match="max_length"):
        truncate_middle(tokenizer, "abc", 1)


def test_input_ids_chat_template_and_length():
    tokenizer = tiny_tokenizer()
    record = _record("hotpotqa", 0, context="x" * 5000)
    ids = build_input_ids(tokenizer, "hotpotqa", record, 1000)
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert 1000 <= ids.shape[1] <= 1000 + 40  # truncated prompt plus the chat template
    assert "x" * 10 in text and "Answer:" in text and "Answer the question" in text  # both ends kept
    plain = build_input_ids(tokenizer, "trec", _record("trec", 0), 1000)
    assert "trec" in NO_CHAT_TASKS and not tokenizer.decode(plain[0]).startswith("<|im_start|>")


def test_jobs_and_stop_rules(data_dir):
    tokenizer = tiny_tokenizer()
    jobs = longbench_jobs(tokenizer, "trec", 512, 2, str(data_dir))
    assert [j.index for j in jobs] == [0, 1] and jobs[0].stop == "first-line" and jobs[0].max_new_tokens == 64
    assert jobs[0].all_classes == ("Location", "Entity", "Human being")
    assert jobs[0].score("Location\nEntity") == 1.0
    assert not jobs[0].done("\n\nLocat") and jobs[0].done("\nLocation\n")
    code = Job("longbench", "lcc", 0, 512, jobs[0].input_ids, ("return x",), 64, "code-line")
    assert not code.done("# comment\n") and not code.done("return x") and code.done("# c\nreturn x\n")
    assert longbench_jobs(tokenizer, "hotpotqa", 512, 9, str(data_dir), cap=8)[0].max_new_tokens == 8
    assert len(longbench_jobs(tokenizer, "hotpotqa", 512, 9, str(data_dir))) == 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))


def test_eval_longbench_end_to_end_and_resume(model_dir, data_dir, tmp_path):
    args = ["eval", "--model", model_dir, "--tasks", "longbench", "--data-dir", str(data_dir), "--out", str(tmp_path),
            "--context-lengths", "300", "--samples", "2", "--settings", "dense,K0.5V0.5", "--window", "4",
            "--chunk", "16", "--max-new-tokens", "6", "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "hotpot" in first.output and "avg" in first.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["tasks"] == ["hotpotqa", "trec", "passage_retrieval_en", "lcc"]
    assert len(doc["samples"]) == 4 * 2 * 2
    assert all(0.0 <= s["score"] <= 1.0 and s["suite"] == "longbench" for s in doc["samples"])
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 16
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "16 results read back" in again.output
    assert (tmp_path / "samples.jsonl").read_text().splitlines() == lines, "nothing recomputed"
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == doc["summary"]


def test_eval_longbench_needs_data(model_dir, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", model_dir, "--tasks", "longbench", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "data_dir" in result.output


def test_hub_needs_datasets_or_says_why():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            load_longbench("hotpotqa", hub=True)
    else:
        pytest.skip("datasets is installed: the hub path would go online")


def test_result_store_resume_rules(tmp_path):
    from mustafar.evaluation.results import ResultStore, SampleResult

    path = tmp_path / "samples.jsonl"
    store = ResultStore(path, {"model": "m", "window": 4})
    result = SampleResult("K0.5V0.5", "hotpotqa", 300, 0, 120, 10, 20, 1.0, method="think", simulated=True, score=0.5)
    store.append(result)
    with path.open("a") as out:
        out.write('{"fingerprint": {"model": "m", "window": 4}, "result": {"setting": "K0')  # cut by a kill
    again = ResultStore(path, {"model": "m", "window": 4})
    assert len(again) == 1 and again.get(result.key) == result and result.key in again
    again.append(SampleResult("dense", "hotpotqa", 300, 1, 120, 20, 20, 1.0, method="dense"))
    assert len(ResultStore(path, {"model": "m", "window": 4})) == 2, "the cut line does not swallow the next one"
    with pytest.raises(ValueError, match="window=4 there, 8 now"):
        ResultStore(path, {"model": "m", "window": 8})
    assert len(ResultStore(path, {"model": "m", "window": 8}, fresh=True)) == 0 and not path.exists()
