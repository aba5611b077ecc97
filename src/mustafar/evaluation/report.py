"""Summaries of evaluation results: rich tables, a JSON file (the plot is in :mod:`.plots`).

One summary row per (method, setting, context length): the mean score per task
(retrieval: fraction correct; RULER: ``string_match_all``; LongBench: the task's
metric, all in [0, 1]) with its 95 % interval (``accuracy_ci``, :mod:`.stats`) and
sample count (``task_samples``), the mean over the tasks of each suite with a
stratified interval (``suites_ci``), perplexity over all
scored tokens, and the KV memory held by the cache (mean bytes per run, all
layers) with its ratio to the dense bytes of the same tokens (sum held / sum
dense). Rows of simulated methods (:mod:`.simulate`) are marked: they prune but
store dense, so their ratio is 100 %.
"""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.table import Table

from .config import EvalConfig, suite_of
from .results import SampleResult
from .runner import method_label, run_configs
from .stats import mean_interval, stratified_interval

__all__ = ["summarize", "table", "tables", "write_json", "versions", "SHORT_NAMES"]

_MIB = 2**20
#: Column names of the tables.
SHORT_NAMES = {
    "niah-multikey": "multikey", "niah_single_1": "s1", "niah_single_2": "s2", "niah_single_3": "s3",
    "niah_multikey_1": "mk1", "niah_multikey_2": "mk2", "niah_multikey_3": "mk3", "niah_multivalue": "mv",
    "niah_multiquery": "mq", "narrativeqa": "nqa", "multifieldqa_en": "mfqa", "hotpotqa": "hotpot",
    "2wikimqa": "2wiki", "gov_report": "gov", "multi_news": "news", "triviaqa": "trivia",
    "passage_count": "pcount", "passage_retrieval_en": "pret", "repobench-p": "repo",
}
_CAPTIONS = {
    "retrieval": "retrieval accuracy in %; ppl: perplexity of the continuation",
    "ruler": "RULER string_match_all in % (s: niah_single, mk: niah_multikey, mv: multivalue, mq: multiquery)",
    "longbench": "LongBench scores in % (QA F1, ROUGE-L, classification, retrieval, count, code edit similarity)",
}


def _row(setting, length: int, runs: list[SampleResult], tasks) -> dict:
    accuracy, interval, counts, per_task = {}, {}, {}, {}
    for task in tasks:
        scores = [r.score if r.score is not None else float(bool(r.correct)) for r in runs if r.task == task]
        if scores and task != "ppl":
            accuracy[task] = sum(scores) / len(scores)
            interval[task] = list(mean_interval(scores))
            counts[task], per_task[task] = len(scores), scores
    suites = defaultdict(list)
    for task, value in accuracy.items():
        suites[suite_of(task)].append(value)
    suite_tasks = defaultdict(list)
    for task in accuracy:
        suite_tasks[suite_of(task)].append(per_task[task])
    scored = [r for r in runs if r.task == "ppl"]
    nll, count = sum(r.nll for r in scored), sum(r.scored_tokens for r in scored)
    held, dense = sum(r.kv_bytes for r in runs), sum(r.dense_bytes for r in runs)
    return {
        "method": method_label(setting), "setting": setting.name, "key_sparsity": setting.key_sparsity,
        "value_sparsity": setting.value_sparsity, "context_length": length,
        "simulated": any(r.simulated for r in runs), "accuracy": accuracy, "accuracy_ci": interval,
        "task_samples": counts, "suites": {s: sum(v) / len(v) for s, v in suites.items()},
        "suites_ci": {s: list(stratified_interval(groups)) for s, groups in suite_tasks.items()},
        "perplexity": math.exp(nll / count) if count else None, "samples": len(runs),
        "kv_bytes": held / len(runs), "dense_bytes": dense / len(runs), "ratio": held / dense,
    }


def summarize(results: list[SampleResult], config: EvalConfig) -> list[dict]:
    """Summary rows, in the order of :func:`~.runner.run_configs` then ``config.context_lengths``."""
    groups: dict[tuple, list[SampleResult]] = defaultdict(list)
    for result in results:
        groups[result.method, result.setting, result.context_length].append(result)
    rows = []
    for setting in run_configs(config):
        for length in config.context_lengths:
            runs = groups.get((method_label(setting), setting.name, length), [])
            if runs:
                rows.append(_row(setting, length, runs, config.tasks))
    return rows


def table(rows: list[dict], suite: str, tasks, title: str = "mustafar eval") -> Table:
    """A rich table of one suite's columns (scores in %, memory in MiB); simulated methods marked ``*``."""
    tasks = [t for t in tasks if any(t in row["accuracy"] for row in rows)]
    show_ppl = suite == "retrieval" and any(row["perplexity"] is not None for row in rows)
    caption = _CAPTIONS[suite] + "; KV MiB: mean KV bytes held per run, all layers; ratio: held / dense bytes"
    if any(row["simulated"] for row in rows):
        caption += "; * simulated: pruned, stored dense (saves no memory)"
    grid = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, caption=caption)
    show_method = len({row["method"] for row in rows} - {"dense"}) > 1 or any(row["simulated"] for row in rows)
    for name in ("method", "setting") if show_method else ("setting",):
        grid.add_column(name, no_wrap=True)
    averaged = suite != "retrieval" and len(tasks) > 1
    names = ["tokens"] + [SHORT_NAMES.get(t, t) for t in tasks] + (["avg"] if averaged else [])
    for name in names + (["ppl"] if show_ppl else []) + ["KV MiB", "dense MiB", "ratio"]:
        grid.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        cells = [row["method"] + ("*" if row["simulated"] else "")] if show_method else []
        cells += [row["setting"], str(row["context_length"])]
        cells += [f"{100 * row['accuracy'][t]:.0f}" if t in row["accuracy"] else "-" for t in tasks]
        if averaged:
            cells.append(f"{100 * row['suites'][suite]:.1f}" if suite in row["suites"] else "-")
        if show_ppl:
            cells.append(f"{row['perplexity']:.3f}" if row["perplexity"] is not None else "-")
        cells += [f"{row['kv_bytes'] / _MIB:.2f}", f"{row['dense_bytes'] / _MIB:.2f}", f"{100 * row['ratio']:.1f}%"]
        grid.add_row(*cells)
    return grid


def tables(rows: list[dict], config: EvalConfig, title: str = "mustafar eval") -> list[Table]:
    """One table per suite present: retrieval (with perplexity), RULER, LongBench."""
    present = {}
    for suite in ("retrieval", "ruler", "longbench"):
        tasks = [t for t in config.tasks if suite_of(t) == suite or (suite == "retrieval" and t == "ppl")]
        if tasks:
            present[suite] = tasks
    out = []
    for suite, tasks in present.items():
        suite_rows = [r for r in rows if any(t in r["accuracy"] for t in tasks)
                      or (suite == "retrieval" and r["perplexity"] is not None)]
        out.append(table(suite_rows, suite, tasks, title if len(present) == 1 else f"{title} [{suite}]"))
    return out


def versions() -> dict:
    """Versions of mustafar, torch, transformers, Python and the platform."""
    import torch
    import transformers

    from .. import __version__  # the package version (a dunder, not a private name)

    return {"mustafar": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.machine()}


def write_json(path: Path, rows: list[dict], results: list[SampleResult], config: EvalConfig, **meta) -> Path:
    """Write ``meta`` (command, date, model, runtime...), versions, config, summary and per-sample results."""
    document = {
        **meta,
        "versions": versions(),
        "config": {**asdict(config), "settings": [asdict(s) | {"name": s.name} for s in config.settings]},
        "simulated_note": "rows with simulated=true prune with the method but store the cache dense: their KV "
                          "bytes are the dense bytes (no memory saved)",
        "summary": rows,
        "samples": [r.to_dict() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return path
