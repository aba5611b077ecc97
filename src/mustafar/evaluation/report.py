"""Summaries of evaluation results: a rich table, a JSON file and a PNG plot.

One summary row per (setting, context length): retrieval accuracy per task
(fraction correct), perplexity over all scored tokens, and the KV memory really
held by the cache (mean bytes per run, all layers) with its ratio to the dense
bytes of the same tokens (sum held / sum dense).
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

from .runner import RETRIEVAL_TASKS, EvalConfig, SampleResult

__all__ = ["summarize", "table", "write_json", "plot", "versions"]

_MIB = 2**20
_SHORT = {"niah-multikey": "multikey"}


def summarize(results: list[SampleResult], config: EvalConfig) -> list[dict]:
    """Summary rows, in the order of ``config.settings`` then ``config.context_lengths``."""
    groups: dict[tuple[str, int], list[SampleResult]] = defaultdict(list)
    for result in results:
        groups[result.setting, result.context_length].append(result)
    rows = []
    for setting in config.settings:
        for length in config.context_lengths:
            runs = groups.get((setting.name, length), [])
            if not runs:
                continue
            accuracy = {}
            for task in RETRIEVAL_TASKS:
                marks = [r.correct for r in runs if r.task == task]
                if marks:
                    accuracy[task] = sum(marks) / len(marks)
            scored = [r for r in runs if r.task == "ppl"]
            nll, count = sum(r.nll for r in scored), sum(r.scored_tokens for r in scored)
            held, dense = sum(r.kv_bytes for r in runs), sum(r.dense_bytes for r in runs)
            rows.append({
                "setting": setting.name, "key_sparsity": setting.key_sparsity,
                "value_sparsity": setting.value_sparsity, "context_length": length, "accuracy": accuracy,
                "perplexity": math.exp(nll / count) if count else None, "samples": len(runs),
                "kv_bytes": held / len(runs), "dense_bytes": dense / len(runs), "ratio": held / dense,
            })
    return rows


def table(rows: list[dict], title: str = "mustafar eval") -> Table:
    """A rich table of the summary rows (accuracy in %, memory in MiB)."""
    tasks = [t for t in RETRIEVAL_TASKS if any(t in row["accuracy"] for row in rows)]
    show_ppl = any(row["perplexity"] is not None for row in rows)
    grid = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, caption="retrieval accuracy in %; ppl: perplexity of the "
                 "continuation; KV MiB: mean KV bytes held per run, all layers; ratio: held / dense bytes")
    grid.add_column("setting", no_wrap=True)
    for name in ["tokens"] + [_SHORT.get(t, t) for t in tasks] + (["ppl"] if show_ppl else []):
        grid.add_column(name, justify="right", no_wrap=True)
    for name in ("KV MiB", "dense MiB", "ratio"):
        grid.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        cells = [row["setting"], str(row["context_length"])]
        cells += [f"{100 * row['accuracy'][t]:.0f}" if t in row["accuracy"] else "-" for t in tasks]
        if show_ppl:
            cells.append(f"{row['perplexity']:.3f}" if row["perplexity"] is not None else "-")
        cells += [f"{row['kv_bytes'] / _MIB:.2f}", f"{row['dense_bytes'] / _MIB:.2f}", f"{100 * row['ratio']:.1f}%"]
        grid.add_row(*cells)
    return grid


def versions() -> dict:
    """Versions of mustafar, torch, transformers, Python and the platform."""
    import torch
    import transformers

    from .. import __version__

    return {"mustafar": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.machine()}


def write_json(path: Path, rows: list[dict], results: list[SampleResult], config: EvalConfig, **meta) -> Path:
    """Write ``meta`` (command, date, model, runtime...), versions, config, summary and per-sample results."""
    document = {
        **meta,
        "versions": versions(),
        "config": {**asdict(config), "settings": [asdict(s) | {"name": s.name} for s in config.settings]},
        "summary": rows,
        "samples": [r.to_dict() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def plot(path: Path, rows: list[dict], title: str = "mustafar eval") -> Path:
    """Accuracy, perplexity and KV memory ratio vs setting (ordered by mean sparsity), one line per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted({r["setting"]: (r["key_sparsity"] + r["value_sparsity"]) / 2 for r in rows}.items(),
                   key=lambda item: item[1])
    names = [name for name, _ in order]
    lengths = sorted({r["context_length"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for length in lengths:
        by_name = {r["setting"]: r for r in rows if r["context_length"] == length}
        xs = [n for n in names if n in by_name]
        for task, marker, style in zip(RETRIEVAL_TASKS, "os^", ("-", "--", ":")):
            if any(task in by_name[n]["accuracy"] for n in xs):
                axes[0].plot(xs, [100 * by_name[n]["accuracy"].get(task, math.nan) for n in xs], marker=marker,
                             linestyle=style, label=f"{task} @ {length}")
        if any(by_name[n]["perplexity"] is not None for n in xs):
            axes[1].plot(xs, [by_name[n]["perplexity"] or math.nan for n in xs], marker="o", label=f"ppl @ {length}")
        axes[2].plot(xs, [100 * by_name[n]["ratio"] for n in xs], marker="o", label=f"{length} tokens")
    labels = ("retrieval accuracy (%)", "perplexity", "KV bytes held / dense (%)")
    titles = ("accuracy vs sparsity", "perplexity vs sparsity", "KV memory vs sparsity")
    for axis, label, heading in zip(axes, labels, titles):
        axis.set_title(heading)
        axis.set_xlabel("setting (ordered by mean sparsity)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    axes[0].set_ylim(-5, 105)
    axes[2].set_ylim(0, 105)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
