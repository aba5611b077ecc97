"""LongBench: data loading, prompts, middle truncation and generation settings.

Source: Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding", arXiv 2308.14508; prompts and generation lengths are those of
its ``config/dataset2prompt.json`` and ``config/dataset2maxlen.json``, the
truncation and chat handling those of its ``pred.py`` (English tasks).

A record has the fields ``context``, ``input``, ``answers`` (list of str),
``all_classes`` (list of str or null), ``length`` (words) and ``dataset``. Records
come from ``<data_dir>/<task>.jsonl`` (one JSON object per line, the layout of
LongBench's ``data.zip``) or, only when asked, from the Hugging Face hub
(``THUDM/LongBench`` through the optional ``datasets`` package).

Prompt building (:func:`build_input_ids`): fill the task's template; if it
holds more than ``max_length`` tokens, keep the first and the last
``max_length // 2`` tokens (LongBench: "truncate in the middle, since the left
and right side may contain crucial instructions"); wrap it in the chat template
except for the few-shot and code tasks (trec, triviaqa, samsum, lcc,
repobench-p), which LongBench feeds as plain text.

Example::

    >>> records = load_longbench("hotpotqa", data_dir="LongBench/data")
    >>> ids = build_input_ids(tokenizer, "hotpotqa", records[0], max_length=3500)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["PROMPTS", "MAX_NEW_TOKENS", "LONGBENCH_TASKS", "NO_CHAT_TASKS", "HUB_NAME", "load_longbench",
           "check_record", "build_prompt", "truncate_middle", "build_input_ids", "available_tasks"]

HUB_NAME = "THUDM/LongBench"
_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any other words."
       "\n\n")
_PASSAGES_QA = _QA + "The following are given passages.\n{context}\n\n" + _QA + "Question: {input}\nAnswer:"
_CONCISE = ("Answer the question as concisely as you can, using a single phrase if possible. Do not provide any "
            "explanation.")
_QASPER = ("Answer the question based on the above article as concisely as you can, using a single phrase or sentence "
           "if possible. If the question cannot be answered based on the information in the article, write "
           "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". "
           "Do not provide any explanation.")
#: LongBench task -> prompt template (``{context}``, ``{input}``).
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. "
                   + _CONCISE + "\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
                   "\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. " + _QASPER.replace("based on the above article ", "")
              + "\n\nArticle: {context}\n\n " + _QASPER + "\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "hotpotqa": _PASSAGES_QA,
    "2wikimqa": _PASSAGES_QA,
    "musique": _PASSAGES_QA,
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
                     "is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
                            "\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                            "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
#: LongBench task -> max new tokens (``dataset2maxlen.json``).
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
LONGBENCH_TASKS = tuple(PROMPTS)
#: Tasks LongBench feeds without the chat template (few-shot and code completion).
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
_FIELDS = ("context", "input", "answers", "all_classes", "length", "dataset")


def _check_task(task: object) -> str:
    if task not in PROMPTS:
        raise ValueError(f"task must be one of the LongBench tasks {list(PROMPTS)}, got {task!r}")
    return task


def check_record(record: object, where: str = "record") -> dict:
    """``record`` if it has LongBench's fields with the right types, else ``ValueError`` naming ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object with fields {_FIELDS}, got {type(record).__name__}")
    missing = [name for name in ("context", "input", "answers") if name not in record]
    if missing:
        raise ValueError(f"{where} must have the fields {_FIELDS}, missing {missing}")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: answers must be a non-empty list of str, got {answers!r:.80}")
    for name in ("context", "input"):
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: {name} must be a str, got {type(record[name]).__name__}")
    classes = record.get("all_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{where}: all_classes must be null or a list of str, got {classes!r:.80}")
    return record


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} must be one JSON object per line ({error.msg})") from None
            records.append(check_record(record, f"{path}:{number}"))
    return records


def available_tasks(data_dir: str | os.PathLike) -> list[str]:
    """LongBench tasks with a ``<task>.jsonl`` file in ``data_dir``, in LongBench's order."""
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data_dir {str(directory)!r} is not a directory")
    return [task for task in PROMPTS if (directory / f"{task}.jsonl").is_file()]


def load_longbench(task: str, data_dir: str | os.PathLike | None = None, hub: bool = False,
                   limit: int | None = None) -> list[dict]:
    """The first ``limit`` records (all for ``None``) of LongBench task ``task``.

    From ``data_dir/<task>.jsonl`` when ``data_dir`` is given; else, with ``hub=True``,
    from ``datasets.load_dataset("THUDM/LongBench", task, split="test")`` (needs network
    access and ``datasets`` < 4, which still runs the dataset's loading script).

    Raises:
        ValueError: unknown task, bad records, or neither ``data_dir`` nor ``hub``.
        FileNotFoundError: the file is missing. ImportError: ``hub`` without ``datasets``.
        ValueError: ``datasets`` >= 4 (no loading scripts).
    """
    _check_task(task)
    if data_dir is not None:
        path = Path(data_dir).expanduser() / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"LongBench file {str(path)!r} does not exist (data_dir must hold <task>.jsonl)")
        records = _read_jsonl(path)
    elif hub:
        records = _load_hub(task)
    else:
        raise ValueError("LongBench data need data_dir (a directory of <task>.jsonl files) or hub=True")
    return records if limit is None else records[:limit]


def _load_hub(task: str) -> list[dict]:
    """``THUDM/LongBench``'s test split of ``task`` (its loading script runs: ``datasets`` < 4 only)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("loading LongBench from the hub needs `pip install 'datasets<4'` (or pass data_dir)") \
            from error
    try:
        rows = datasets.load_dataset(HUB_NAME, task, split="test", trust_remote_code=True)
    except RuntimeError as error:  # datasets >= 4 refuses loading scripts
        raise ValueError(f"{HUB_NAME} could not be loaded with datasets {datasets.__version__} ({error}): install "
                         "'datasets<4', or unpack LongBench's data.zip and pass its directory as data_dir") from error
    return [check_record(dict(row), f"{HUB_NAME}/{task}") for row in rows]


def build_prompt(task: str, record: dict) -> str:
    """The task's template filled with the record's ``context`` and ``input``."""
    check_record(record)
    return PROMPTS[_check_task(task)].format(context=record["context"], input=record["input"])


def truncate_middle(tokenizer, text: str, max_length: int) -> str:
    """``text`` cut to its first and last ``max_length // 2`` tokens when it holds more than ``max_length``.

    Tokens are counted without special tokens; both halves are decoded with
    ``skip_special_tokens=True`` and concatenated, as LongBench's ``pred.py`` does.

    Raises:
        ValueError: ``max_length`` not an int >= 2.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens), got {max_length!r}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def build_input_ids(tokenizer, task: str, record: dict, max_length: int) -> torch.Tensor:
    """Token ids ``[1, n]`` (int64) of the truncated prompt; chat-templated unless ``task`` is in :data:`NO_CHAT_TASKS`.

    Raises:
        ValueError: unknown ``task``, a bad record or ``max_length``.
    """
    from ..generation import chat_input_ids

    prompt = truncate_middle(tokenizer, build_prompt(task, record), max_length)
    if task in NO_CHAT_TASKS:
        return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    return chat_input_ids(tokenizer, prompt)
