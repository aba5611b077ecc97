"""The evaluation plot: score vs sparsity setting per pruning method, perplexity and KV memory.

One panel per suite present (retrieval, RULER, LongBench: the mean score over the
suite's tasks, said so on the axis, with its 95 % interval as error bars when the
rows carry one), one for perplexity if measured, and one for the KV bytes held
relative to dense. The x axis lists the settings in order of mean sparsity
(``dense`` first, where every method's line starts); one line per method and
context length. Simulated methods are dashed and, holding dense bytes, sit at 100 %
in the memory panel. Score and memory axes start at 0, and so does perplexity (its
rise is read against the whole value, not a zoomed band). The title says the context
lengths and the samples per task; a single line's points carry their values.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import suite_of

__all__ = ["plot", "describe"]

_SUITES = (("retrieval", "retrieval accuracy (%)"), ("ruler", "RULER score (%)"), ("longbench", "LongBench score (%)"))
#: Horizontal shift between the lines of one panel, in settings (so that overlapping intervals stay apart).
_DODGE = 0.06
_MARKERS = {"dense": "s", "per-token": "o", "output-aware": "^", "per-channel": "v", "think": "D"}


def _order(rows: list[dict]) -> list[str]:
    mean = {r["setting"]: (r["key_sparsity"] + r["value_sparsity"]) / 2 for r in rows}
    return sorted(mean, key=lambda name: (mean[name], name))


def _lines(rows: list[dict]):
    """``(method, length, [rows])`` per line, each line starting at the dense row of its length."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"] or ["dense"]
    for length in sorted({r["context_length"] for r in rows}):
        dense = [r for r in rows if r["method"] == "dense" and r["context_length"] == length]
        for method in methods:
            own = [r for r in rows if r["method"] == method and r["context_length"] == length]
            yield method, length, (dense + own) if method != "dense" else dense


def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    panels = [(suite, label) for suite, label in _SUITES if any(suite in r["suites"] for r in rows)]
    if any(r["perplexity"] is not None for r in rows):
        panels.append(("ppl", "perplexity"))
    return panels + [("memory", "KV bytes held / dense (%)")]


def _error(row: dict, panel: str) -> tuple[float, float]:
    """Distances (below, above) of the panel's 95 % interval from the value, in %; (0, 0) if none."""
    interval = row.get("suites_ci", {}).get(panel) if panel not in ("ppl", "memory") else None
    if not interval:
        return 0.0, 0.0
    value = _value(row, panel)
    return max(0.0, value - 100 * interval[0]), max(0.0, 100 * interval[1] - value)


def _label(panel: str, label: str, rows: list[dict]) -> str:
    if panel in ("ppl", "memory"):
        return label
    tasks = max((sum(suite_of(t) == panel for t in r["accuracy"]) for r in rows), default=0)
    return label.replace(" (%)", f", mean of {tasks} task{'s' if tasks != 1 else ''} (%)")


def describe(rows: list[dict]) -> str:
    """``"context 4096, 8192 tokens; 25 samples per task"`` (a range when the counts differ)."""
    lengths = ", ".join(str(n) for n in sorted({r["context_length"] for r in rows}))
    counts = sorted({n for r in rows for n in r.get("task_samples", {}).values()})
    samples = "" if not counts else (f"; {counts[0]} samples per task" if len(counts) == 1 else
                                     f"; {counts[0]}-{counts[-1]} samples per task")
    return f"context {lengths} tokens{samples}"


def _value(row: dict, panel: str) -> float:
    if panel == "ppl":
        return row["perplexity"] if row["perplexity"] is not None else math.nan
    if panel == "memory":
        return 100 * row["ratio"]
    return 100 * row["suites"].get(panel, math.nan)


def plot(path: Path, rows: list[dict], title: str = "mustafar eval") -> Path:
    """Write the PNG at ``path`` (directories created) and return ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, panels = _order(rows), _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    lengths = sorted({r["context_length"] for r in rows})
    lines = list(_lines(rows))
    for axis, (panel, label) in zip(axes[0], panels):
        for number, (method, length, line) in enumerate(lines):
            line = sorted(line, key=lambda r: order.index(r["setting"]))
            simulated = any(r["simulated"] for r in line)
            tag = f"{method}{' (sim.)' if simulated else ''}" + (f" @ {length}" if len(lengths) > 1 else "")
            dodge = _DODGE * (number - (len(lines) - 1) / 2)  # side by side: intervals stay readable
            xs = [order.index(r["setting"]) + dodge for r in line]
            ys = [_value(r, panel) for r in line]
            errors = [_error(r, panel) for r in line]
            axis.errorbar(xs, ys, yerr=[[e[0] for e in errors], [e[1] for e in errors]] if any(map(any, errors))
                          else None, label=tag, marker=_MARKERS.get(method, "o"), linestyle="--" if simulated else "-",
                          capsize=3)
            if len(lines) == 1:
                for x, y in zip(xs, ys):
                    axis.annotate(f"{y:.1f}" if panel != "ppl" else f"{y:.2f}", (x, y), textcoords="offset points",
                                  xytext=(0, 6), ha="center", fontsize=7)
        axis.set_title(label.split(" (")[0] + " vs sparsity")
        axis.set_xlabel("setting (ordered by mean sparsity)")
        axis.set_ylabel(_label(panel, label, rows))
        axis.grid(alpha=0.3)
        axis.set_xticks(range(len(order)), order, rotation=30)
        if panel == "ppl":
            axis.set_ylim(bottom=0)
        else:
            axis.set_ylim(0, 105)
        if axis.lines:
            axis.legend(fontsize=7)
    bars = "; error bars: 95 % intervals" if any(r.get("suites_ci") for r in rows) else ""
    fig.suptitle(f"{title}\n{describe(rows)}{bars}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
