"""The pruning study's outputs: paired comparisons, Markdown tables, plots and the data sections of a document.

:func:`write_outputs` turns a study's results (:class:`~.results.SampleResult`, one per
sample x method x setting) into ``study.json`` (meta, versions, configuration, summary rows
with 95 % intervals from :mod:`.report` / :mod:`.stats`, :func:`comparisons`, every
sample), ``tables.md`` and the plots (:func:`render`). :func:`update_sections` writes the
data sections of a Markdown document between ``<!-- study:NAME:begin -->`` and
``<!-- study:NAME:end -->`` markers (:func:`data_sections`), leaving the prose around
them alone. Used by ``benchmarks/eval_study.py`` (the run) and
``docs/evaluation/make_study_docs.py`` (the document).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from . import report
from .config import EvalConfig
from .plots import plot
from .stats import bootstrap_interval

__all__ = ["COMPARISONS", "comparisons", "markdown_tables", "comparison_table", "write_outputs", "render",
           "data_sections", "update_sections"]

#: Paired comparisons: name -> the baseline (method, setting) of a (method, setting), or None (not compared).
COMPARISONS = {
    "vs dense": lambda m, s: ("dense", "dense") if m != "dense" else None,
    "per-token vs per-channel": lambda m, s: ("per-channel", s) if m == "per-token" else None,
    "per-token vs output-aware": lambda m, s: ("output-aware", s) if m == "per-token" else None,
    "per-token vs think": lambda m, s: ("think", s) if m == "per-token" else None,
    "keys 0.5 vs values 0.5": lambda m, s: (m, "K0V0.5") if s == "K0.5V0" else None,
    "0.8 vs 0.7": lambda m, s: (m, "K0.7V0.7") if s == "K0.8V0.8" else None,
    "fp8 vs fp16 kept values": lambda m, s: (None if not s.endswith("-fp8") else
                                             ("dense", "dense") if s == "K0V0-fp8" else (m, s[:-len("-fp8")])),
}


def comparisons(results: list, names: dict = COMPARISONS) -> list[dict]:
    """Paired differences of RULER mean scores (same samples), with stratified bootstrap 95 % intervals.

    ``delta``: mean over tasks of (mean score - baseline's mean score on the same sample indices).
    """
    scores: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in results:
        if r.task != "ppl":
            scores.setdefault((r.method, r.setting, r.context_length), {}).setdefault(r.task, {})[r.index] = r.score
    out = []
    for name, baseline in names.items():
        for (method, setting, length), tasks in sorted(scores.items()):
            other = baseline(method, setting)
            theirs = scores.get((*other, length)) if other else None
            if not theirs:
                continue
            groups, paired = [], []
            for task in sorted(set(tasks) & set(theirs)):
                indices = sorted(set(tasks[task]) & set(theirs[task]))
                if indices:
                    groups.append([tasks[task][i] for i in indices])
                    paired.append([theirs[task][i] for i in indices])
            if not groups:
                continue
            delta = sum(sum(g) / len(g) - sum(p) / len(p) for g, p in zip(groups, paired)) / len(groups)
            low, high = bootstrap_interval(groups, paired)
            discordant = sum(a != b for g, p in zip(groups, paired) for a, b in zip(g, p))
            out.append({"comparison": name, "method": method, "setting": setting, "against": " ".join(other),
                        "context_length": length, "tasks": len(groups), "samples": sum(len(g) for g in groups),
                        "discordant": discordant, "delta": delta, "ci95": [low, high],
                        "excludes_zero": low > 0 or high < 0})
    return out


def markdown_tables(rows: list[dict], tasks) -> str:
    """Markdown: RULER mean score with its 95 % interval per (method, setting) and length; perplexity."""
    lengths = sorted({r["context_length"] for r in rows if r["suites"]})
    header = " | ".join(f"RULER @ {n} (95 % CI)" for n in lengths)
    lines = [f"| method | setting | {header} | KV held / dense @ {lengths[-1] if lengths else '-'} |",
             "|---|---|" + "---|" * len(lengths) + "---|"]
    keyed = {(r["method"], r["setting"], r["context_length"]): r for r in rows if r["suites"]}
    for method, setting in dict.fromkeys((r["method"], r["setting"]) for r in rows if r["suites"]):
        cells = []
        for n in lengths:
            row = keyed.get((method, setting, n))
            cells.append(_cell(row["suites"].get("ruler"), row["suites_ci"].get("ruler")) if row else "-")
        ratio = keyed[(method, setting, lengths[-1])]["ratio"] if (method, setting, lengths[-1]) in keyed else math.nan
        sim = "*" if any(r["simulated"] for r in rows if r["method"] == method) else ""
        lines.append(f"| {method}{sim} | {setting} | " + " | ".join(cells) + f" | {100 * ratio:.1f} % |")
    ppl = [r for r in rows if r["perplexity"] is not None]
    if ppl:
        lines += ["", f"| method | setting | perplexity @ {ppl[0]['context_length']} |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['setting']} | {r['perplexity']:.3f} |" for r in ppl]
    per_task = [r for r in rows if r["accuracy"]]
    if per_task:
        names = [t for t in tasks if any(t in r["accuracy"] for r in per_task)]
        lines += ["", "| method | setting | tokens | " + " | ".join(report.SHORT_NAMES.get(t, t) for t in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        lines += [f"| {r['method']} | {r['setting']} | {r['context_length']} | " + " | ".join(
            f"{100 * r['accuracy'][t]:.0f}" if t in r["accuracy"] else "-" for t in names) + " |" for r in per_task]
    return "\n".join(lines) + "\n"


def _cell(value, interval) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else f"{100 * value:.1f}"


def write_outputs(out: Path, results: list, study_configs: list[EvalConfig], meta: dict) -> dict:
    """study.json, tables.md and the plots from ``results``; returns the JSON document."""
    rows = [row for config in study_configs for row in report.summarize(
        [r for r in results if r.task in config.tasks and r.context_length in config.context_lengths], config)]
    document = {**meta, "versions": report.versions(), "summary": rows, "comparisons": comparisons(results),
                "config": [json.loads(json.dumps(_config_dict(c), default=str)) for c in study_configs],
                "interval_note": "95 % intervals: per task Wilson of sum(scores) out of n (exact for 0/1 scores, "
                                 "conservative for partial credit); suite means: stratified normal interval with "
                                 "Agresti-Coull task variances; paired differences: percentile bootstrap (4000 "
                                 "resamples, seed 0) stratified by task, with the count of discordant samples",
                "simulated_note": "per-channel, output-aware and think run simulated (pruned, stored dense)",
                "samples": [r.to_dict() for r in results]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    render(document, out)
    return document


def _config_dict(config: EvalConfig) -> dict:
    return {**asdict(config), "settings": [s.name for s in config.settings]}


def render(document: dict, out: Path) -> list[Path]:
    """tables.md and one plot per context length (RULER) plus the perplexity plot, from a study document."""
    rows, model = document["summary"], document.get("model", {})
    tasks = [t for c in document["config"] for t in c["tasks"]]
    (out / "tables.md").write_text(markdown_tables(rows, tasks), encoding="utf-8")
    name = str(model.get("name", "model"))
    name = Path(name).name if name.endswith(".gguf") else name  # a file's name, not where it lay on the machine
    title = f"{name}, {model.get('dtype', '')}, {model.get('gpu') or model.get('device', '')}"
    paths = []
    for length in sorted({r["context_length"] for r in rows if r["suites"]}):
        paths.append(plot(out / f"ruler-{length}.png", [r for r in rows if r["context_length"] == length
                                                          and r["suites"]], title=f"RULER: {title}"))
    ppl = [r for r in rows if r["perplexity"] is not None]
    if ppl:
        paths.append(plot(out / "ppl.png", ppl, title=f"perplexity: {title}"))
    return paths




def comparison_table(items: list[dict]) -> str:
    """Markdown table of :func:`comparisons`: difference in points with its 95 % interval, discordant samples."""
    lines = ["| comparison | method | setting | against | tokens | difference (points, 95 % CI) "
             "| discordant / samples |",
             "|---|---|---|---|---|---|---|"]
    for c in items:
        low, high = c["ci95"]
        mark = " *" if c["excludes_zero"] else ""
        lines.append(f"| {c['comparison']} | {c['method']} | {c['setting']} | {c['against']} | {c['context_length']} "
                     f"| {100 * c['delta']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{mark} "
                     f"| {c['discordant']} / {c['samples']} |")
    return "\n".join(lines) + "\n\n`*`: the interval excludes 0.\n"


def _setup(document: dict) -> str:
    model, versions = document.get("model", {}), document.get("versions", {})
    state = "complete" if document.get("complete", True) else \
        f"INCOMPLETE: {document.get('runs')} of {document.get('total')} runs"
    invocations = document.get("invocations") or [{"command": document.get("command"), "date": document.get("date"),
                                                    "runtime_s": document.get("runtime_s", 0.0)}]
    total_s = sum(i.get("runtime_s", 0.0) for i in invocations)
    digest = f" (GGUF sha256 {model['gguf_sha256']})" if model.get("gguf_sha256") else ""
    lines = [
        f"- Date: {document.get('date')}; run time {total_s:.0f} s in {len(invocations)} invocation"
        f"{'s' if len(invocations) > 1 else ''} (the last one's model load {document.get('model_load_s', 0):.0f} s); "
        f"{state}.",
        f"- Device: {model.get('gpu') or model.get('device')}; model {model.get('name')}{digest} in "
        f"{model.get('dtype')}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
    ]
    for config in document.get("config", []):
        lines.append(
            f"- Tasks: {', '.join(config.get('tasks', []))}; context lengths {config.get('context_lengths')}; "
            f"{config.get('samples')} samples per task and length; methods {', '.join(config.get('methods', []))}; "
            f"settings {', '.join(config.get('settings', []))}; answers capped at "
            f"{config.get('max_new_tokens_cap')} tokens.")
    for i, invocation in enumerate(invocations, 1):
        done = f", {invocation['runs_done']} runs" if "runs_done" in invocation else ""
        lines.append(f"- Command {i} ({invocation.get('date')}, {invocation.get('runtime_s', 0):.0f} s{done}): "
                     f"`{invocation.get('command')}`")
    lines.append(f"- Intervals: {document.get('interval_note', '')}.")
    return "\n".join(lines) + "\n"


def data_sections(document: dict, plots_dir: str = "evaluation") -> dict[str, str]:
    """The data sections of the study document: ``setup``, ``headline``, ``comparisons``, ``per-task``, ``plots``."""
    rows = document["summary"]
    tasks = [t for c in document["config"] for t in c["tasks"]]
    tables = markdown_tables(rows, tasks).split("\n\n")
    lengths = sorted({r["context_length"] for r in rows if r["suites"]})
    images = [f"![RULER at {n} tokens]({plots_dir}/ruler-{n}.png)" for n in lengths]
    if any(r["perplexity"] is not None for r in rows):
        images.append(f"![perplexity]({plots_dir}/ppl.png)")
    return {"setup": _setup(document), "headline": "\n\n".join(t for t in tables if "RULER @" in t or
                                                                  "perplexity @" in t).strip() + "\n",
            "comparisons": comparison_table(document["comparisons"]),
            "per-task": "\n\n".join(t for t in tables if "| tokens |" in t).strip() + "\n",
            "plots": "\n\n".join(images) + "\n"}


def update_sections(text: str, sections: dict[str, str]) -> str:
    """``text`` with each ``<!-- study:NAME:begin -->`` ... ``<!-- study:NAME:end -->`` body replaced.

    Raises:
        ValueError: a section's markers missing from ``text``.
    """
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- study:{re.escape(name)}:begin -->\n).*?(<!-- study:{re.escape(name)}:end -->)",
                             re.S)
        if not pattern.search(text):
            raise ValueError(f"text must hold the markers <!-- study:{name}:begin --> and <!-- study:{name}:end -->, "
                             "got neither pair")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text
