"""The pruning study at scale (issue 16): RULER x methods x settings at 4k and 8k, perplexity at 8k, 95 % intervals.

Runs :func:`mustafar.evaluation.run_eval` (batched: each length's prompts prefilled and decoded
together, left-padded) on the embedded SmolLM2-135M-Instruct, or ``--model``, and writes into
``--out``:

- ``samples.jsonl``: every finished sample at once; the same command again resumes (skips them);
- ``study.json``: command, date, versions, device, run time, the configuration, the summary rows
  (per task and suite means with 95 % intervals: Wilson for 0/1 scores, percentile bootstrap
  otherwise, stratified by task for suite means), paired comparisons with intervals (each setting
  against dense, per-token against each other method, keys against values, the step from 0.7 to
  0.8) and every sample;
- ``tables.md`` and ``ruler-<length>.png`` / ``ppl.png`` (``docs/evaluation/make_study_docs.py``
  renders the same from the JSON, and the data sections of docs/EVALUATION.md).

Progress: one line per ``--report-every`` seconds with the runs done, the rate and an ETA;
``--time-budget-s`` (counted from the start, model load included) stops cleanly after the
(method, setting) in progress (results kept, the same command resumes). ``--plan`` builds
every prompt, prints the batches and a run-time estimate (:func:`estimate`) and runs nothing;
``--smoke`` is a tiny run (2 tasks, 512 tokens, 2 samples) for CI.

Usage (repository root)::

    PYTHONPATH=src python benchmarks/eval_study.py --device cuda --dtype bfloat16 --out study-h200
    PYTHONPATH=src python benchmarks/eval_study.py --plan            # batches and estimate, CPU, nothing run
    PYTHONPATH=src python benchmarks/eval_study.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import mustafar
from mustafar.config import parse_setting
from mustafar.evaluation import EvalConfig, ResultStore, run_eval
from mustafar.evaluation.batched import auto_batch_size, length_batches
from mustafar.evaluation.ruler import RULER_TASKS
from mustafar.evaluation.runner import prepare_text, run_configs, task_jobs
from mustafar.evaluation.study import write_outputs
from mustafar.models import embedded_gguf_path

METHODS = ("per-token", "per-channel", "output-aware", "think")
SETTINGS = ("dense", "K0.5V0.5", "K0.7V0.7", "K0.8V0.8", "K0.5V0.0", "K0.0V0.5")
#: Settings with FP8 kept values (issue 15), added by ``--fp8`` where this version has them.
FP8_SETTINGS = ("K0.5V0.5-fp8", "K0.7V0.7-fp8", "K0V0-fp8")
FULL = {"tasks": tuple(RULER_TASKS), "lengths": (4096, 8192), "samples": 25, "ppl_length": 8192, "ppl_tokens": 256,
        "max_new_tokens": 48, "methods": METHODS, "settings": SETTINGS}
SMOKE = {"tasks": ("niah_single_1", "vt"), "lengths": (512,), "samples": 2, "ppl_length": 512, "ppl_tokens": 32,
         "max_new_tokens": 6, "methods": ("per-token", "think"), "settings": ("dense", "K0.5V0.5")}
#: Free memory of an H200 for planning a GPU run on another machine (139 GiB visible, weights and context taken).
H200_FREE_BYTES = 135 * 2**30
#: H200 costs behind :func:`estimate` (SmolLM2-135M, bf16, eager): one decode step of a ~92-row batch over 30
#: layers (Python-bound; calibrated so that the full study's estimate matches its 714 s run on 2026-12-03, which
#: the earlier assumption of 35 ms put at 475 s), prefill throughput, building one setting's cache from the
#: prefill, and start-up (GGUF conversion, CUDA kernel compilation ~35 s, CUDA context).
GPU_COSTS = {"decode_step_s": 0.061, "prefill_tokens_per_s": 250_000.0, "fill_s": 0.15, "startup_s": 75.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF id, directory or .gguf; default: the embedded model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=Path, default=Path("study"), help="output directory; default ./study")
    parser.add_argument("--tasks", default=None, help="comma-separated; default: the 11 RULER tasks")
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths; default 4096,8192")
    parser.add_argument("--samples", type=int, default=None, help="samples per task and length; default 25")
    parser.add_argument("--methods", default=None, help=f"default {','.join(METHODS)}")
    parser.add_argument("--settings", default=None, help=f"default {','.join(SETTINGS)}")
    parser.add_argument("--fp8", action="store_true", help=f"add {', '.join(FP8_SETTINGS)} (where supported)")
    parser.add_argument("--ppl-length", type=int, default=None, help="perplexity window (0: none); default 8192")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer cap; default 48 (UUIDs need ~36)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: auto (fills the GPU; 1 on CPU)")
    parser.add_argument("--window", type=int, default=32, help="dense local window; default 32")
    parser.add_argument("--chunk", type=int, default=256, help="tokens moved to the store at once; default 256")
    parser.add_argument("--seed", type=int, default=0, help="seed of the RULER data; default 0")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop cleanly after this long (resume)")
    parser.add_argument("--report-every", type=float, default=15.0, help="seconds between progress lines; default 15")
    parser.add_argument("--verbose", action="store_true", help="show transformers' loading bars and warnings")
    parser.add_argument("--fresh", action="store_true", help="discard the results already in --out")
    parser.add_argument("--plan", action="store_true", help="print batches and an estimate; run nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny CI run (2 tasks, 512 tokens, 2 samples)")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    split = lambda text, kind=str: tuple(kind(x) for x in text.split(",") if x.strip())  # noqa: E731
    args.tasks = split(args.tasks) if args.tasks else preset["tasks"]
    args.lengths = split(args.lengths, int) if args.lengths else preset["lengths"]
    args.methods = split(args.methods) if args.methods else preset["methods"]
    args.settings = split(args.settings) if args.settings else preset["settings"]
    if args.fp8:
        args.settings += FP8_SETTINGS
    for name in ("samples", "ppl_length", "max_new_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.ppl_tokens = preset["ppl_tokens"]
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    for name in ("samples", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.ppl_length < 0:
        parser.error(f"--ppl-length must be >= 0 (0: no perplexity), got {args.ppl_length}")
    return args


def configs(args) -> list[EvalConfig]:
    """The perplexity run (``--ppl-length``, if any) and the generation run (all lengths), as EvalConfigs."""
    try:
        settings = tuple(dict.fromkeys(parse_setting(s, window=args.window, chunk=args.chunk) for s in args.settings))
    except ValueError as error:
        fp8 = " (the FP8 settings need issue 15's FP8 kept values)" if args.fp8 else ""
        raise SystemExit(f"error: --settings: {error}{fp8}") from error
    common = dict(settings=settings, methods=args.methods, seed=args.seed, batch_size=args.batch_size,
                  max_new_tokens_cap=args.max_new_tokens, ppl_tokens=args.ppl_tokens)
    out = [EvalConfig(tasks=args.tasks, context_lengths=args.lengths, samples=args.samples, **common)]
    if args.ppl_length:  # first: short, and kept whole if the time budget stops the run
        out.insert(0, EvalConfig(tasks=("ppl",), context_lengths=(args.ppl_length,), samples=1, **common))
    return out


def units(config: EvalConfig) -> int:
    """Runs (sample x method x setting) of ``config``: its progress total."""
    per_run = config.samples * len(config.context_lengths) * len([t for t in config.tasks if t != "ppl"])
    per_run += config.ppl_windows * len(config.context_lengths) * ("ppl" in config.tasks)
    return per_run * len(run_configs(config))


class _OverBudget(Exception):
    pass


class ProgressStore(ResultStore):
    """A :class:`ResultStore` that prints progress with an ETA and stops after ``budget_s`` seconds."""

    def __init__(self, path, fingerprint, fresh, total: int, every_s: float, budget_s: float | None,
                 start: float | None = None):
        super().__init__(path, fingerprint, fresh=fresh)
        self.total, self.every_s, self.budget_s = total, every_s, budget_s
        self.start = start if start is not None else time.perf_counter()  # the budget counts from here
        self.last = time.perf_counter()
        self.first, self.new = len(self), 0

    def append(self, result) -> None:
        super().append(result)
        self.new += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s or len(self) >= self.total:
            self.last = now
            rate = self.new / (now - self.start)
            left = max(0, self.total - len(self))
            print(f"[{now - self.start:7.1f} s] {len(self)}/{self.total} runs ({self.first} resumed), "
                  f"{rate:.1f} runs/s, ETA {left / rate:.0f} s; last: {result.task} {result.context_length} "
                  f"{result.method} {result.setting}", flush=True)
        if self.budget_s is not None and now - self.start > self.budget_s:
            raise _OverBudget


def estimate(model, tokenizer, config: EvalConfig, costs: dict = GPU_COSTS, batch_size: int | None = None) -> dict:
    """Work of ``config`` (prompts built, batches as the runner forms them) and its time under ``costs``.

    Decode steps are an upper bound: every batch decodes up to its longest answer cap under
    every (method, setting) (rows that stop early do not shorten a batch whose slowest row runs on).
    Off CUDA, batches are planned as :func:`auto_batch_size` would form them on an H200.
    """
    start = time.perf_counter()
    text, token_ids = prepare_text(config, tokenizer)
    caches = len(run_configs(config))
    work = {"prompts": 0, "prefill_tokens": 0, "batches": 0, "decode_steps_max": 0, "fills": 0, "batch_sizes": []}
    for length in config.context_lengths:
        jobs = [j for t in config.tasks if t != "ppl" for j in task_jobs(tokenizer, config, t, length, text)]
        if not jobs:
            continue
        lengths = [j.input_ids.shape[1] for j in jobs]
        size = batch_size or config.batch_size or auto_batch_size(
            model, max(lengths), None if model.device.type == "cuda" else H200_FREE_BYTES)
        for group in length_batches(lengths, size):
            work["batch_sizes"].append(len(group))
            work["prefill_tokens"] += len(group) * max(lengths[i] for i in group)
            work["decode_steps_max"] += caches * max(jobs[i].max_new_tokens for i in group)
            work["fills"] += caches
        work["prompts"] += len(jobs)
    if "ppl" in config.tasks:
        for length in config.context_lengths:
            work["prefill_tokens"] += length - config.ppl_tokens
            work["decode_steps_max"] += caches * math.ceil((config.ppl_tokens - 1) / config.ppl_chunk)
            work["fills"] += caches
    work["batches"] = len(work["batch_sizes"])
    work["build_s"] = time.perf_counter() - start  # building the prompts (tokenizer work, on the CPU)
    work["estimate_s"] = (work["decode_steps_max"] * costs["decode_step_s"] + work["fills"] * costs["fill_s"]
                          + work["prefill_tokens"] / costs["prefill_tokens_per_s"] + work["build_s"])
    return work


def earlier_invocations(out: Path, fresh: bool) -> list[dict]:
    """The invocations recorded in ``out/study.json`` by the runs this one resumes (none with ``--fresh``).

    Each is ``{"command", "date", "runtime_s", "runs_done"}``; a study.json written before this field existed
    counts as one invocation that did all its runs.
    """
    path = out / "study.json"
    if fresh or not path.is_file():
        return []
    document = json.loads(path.read_text(encoding="utf-8"))
    if "invocations" in document:
        return list(document["invocations"])
    return [{"command": document.get("command"), "date": document.get("date"),
             "runtime_s": document.get("runtime_s", 0.0), "runs_done": document.get("runs", 0)}]


def main(argv=None) -> int:
    args = parse_args(argv)
    study_configs = configs(args)
    start = time.perf_counter()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    model, tokenizer = mustafar.load_model(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - start
    name = args.model or "SmolLM2-135M-Instruct (embedded)"
    info = {"name": name, "dtype": args.dtype, "device": str(model.device),
            "gpu": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None}
    gguf = embedded_gguf_path() if args.model is None else Path(args.model)
    if gguf.suffix == ".gguf" and gguf.is_file():  # which weights ran: a copy of the embedded file has its digest
        info["gguf_sha256"] = hashlib.sha256(gguf.read_bytes()).hexdigest()
    print(f"model {name} {args.dtype} on {model.device}, loaded in {load_s:.1f} s", flush=True)
    if args.plan:
        total_s = GPU_COSTS["startup_s"]
        for config in study_configs:
            work = estimate(model, tokenizer, config, batch_size=args.batch_size)
            total_s += work["estimate_s"]
            print(json.dumps({k: v for k, v in work.items() if k != "batch_sizes"}), "batch sizes",
                  work["batch_sizes"], flush=True)
        print(f"estimated run time on an H200: {total_s:.0f} s (upper bound on decode steps; assumed costs "
              f"{GPU_COSTS})", flush=True)
        return 0
    total = sum(units(c) for c in study_configs)
    fingerprint = {"model": name, "dtype": args.dtype, "window": args.window, "chunk": args.chunk,
                   "max_new_tokens_cap": args.max_new_tokens, "ppl_tokens": args.ppl_tokens}
    store = ProgressStore(args.out / "samples.jsonl", fingerprint, args.fresh, total, args.report_every,
                          args.time_budget_s, start)
    print(f"{total} runs ({len(store)} already in {args.out / 'samples.jsonl'})", flush=True)
    complete = True
    try:
        for config in study_configs:
            run_eval(model, tokenizer, config, progress=False, store=store)
    except _OverBudget:
        complete = False
        print(f"time budget of {args.time_budget_s} s reached: {len(store)}/{total} runs kept; run the same "
              "command again to resume", flush=True)
    results = list(store.results.values())
    runtime_s = time.perf_counter() - start
    command = shlex.join([sys.executable, *sys.argv])
    invocations = earlier_invocations(args.out, args.fresh) + [
        {"command": command, "date": date, "runtime_s": runtime_s, "runs_done": len(results) - store.first}]
    meta = {"command": command, "date": date, "model": info, "complete": complete,
            "runtime_s": runtime_s, "model_load_s": load_s, "runs": len(results), "total": total,
            "resumed": store.first, "invocations": invocations,
            "runtime_total_s": sum(i["runtime_s"] for i in invocations)}
    write_outputs(args.out, results, study_configs, meta)
    print((args.out / "tables.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out / 'study.json'}, tables.md and plots in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
