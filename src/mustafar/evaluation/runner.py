"""Run the evaluation: every task x context length x sample x (pruning method, sparsity setting).

Each prompt (a :class:`~.jobs.Job`) or perplexity text window is prefilled once,
densely (prefill attention is dense in Mustafar, arXiv 2505.22913); its keys and
values then go into a fresh cache per (method, setting)
(:func:`mustafar.generation.fill_cache`), and every generated or scored token goes
through decode steps that read that cache:

- ``dense``: transformers' ``DynamicCache`` (the baseline, run once whatever the methods);
- ``per-token``: :class:`mustafar.MustafarCache`, really pruned and compressed;
- ``output-aware``, ``per-channel``, ``think``: :class:`~.simulate.SimulatedCache`,
  pruned at the same points, stored dense (``simulated``; saves no memory). Their
  observation queries are recorded during the prefill (:func:`~.simulate.observe_queries`).

Prompts are batched (:mod:`.batched`, ``EvalConfig.batch_size``): all generation jobs of
one context length, grouped by prompt length, left-padded, prefilled together and decoded
together under each (method, setting); every row gives what its prompt gives alone.

The KV bytes held and the dense bytes of the same tokens are read from the cache
when each row stops (a row's share of its batch's bytes: see :func:`_row_bytes`).
Finished runs go to a :class:`~.results.ResultStore` at once
and are skipped when found there (resume).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

from tqdm.auto import tqdm

from ..cache import MustafarCache
from ..config import SparsityConfig
from ..generation import eos_ids, fill_cache, kv_bytes, make_cache, prefill
from .batched import (alone_nbytes, auto_batch_size, batched_greedy, batched_prefill, fill_batch, left_pad,
                      length_batches)
from .config import TASKS, EvalConfig
from .jobs import Job, longbench_jobs, retrieval_jobs, ruler_jobs
from .longbench import LONGBENCH_TASKS
from .perplexity import score_continuation, text_windows
from .results import ResultStore, SampleResult
from .ruler import RULER_TASKS, word_pool
from .simulate import SimulatedCache, observe_queries
from .tasks import niah_samples, passkey_samples
from .texts import load_text

__all__ = ["EvalConfig", "SampleResult", "run_eval", "run_configs", "make_eval_cache", "method_label", "prepare_text",
           "task_jobs", "TASKS"]
#: Distinct words a RULER haystack text must hold (:func:`~.ruler.ruler_samples` checks it too).
_RULER_MIN_WORDS = 100


def run_configs(config: EvalConfig) -> list[SparsityConfig]:
    """The caches to run: ``dense`` once (if asked), then every method x every sparse setting.

    FP8 settings (``-fp8``) run with the ``per-token`` method only (the only rule the format stores).
    """
    dense = [s for s in config.settings if s.is_dense][:1]
    sparse = [s for s in config.settings if not s.is_dense]
    return dense + [SparsityConfig(s.key_sparsity, s.value_sparsity, s.window, s.chunk, method, s.kept_dtype)
                    for method in config.methods for s in sparse if not s.fp8 or method == "per-token"]


def method_label(setting: SparsityConfig) -> str:
    """``dense`` for the dense setting, else the pruning method's name."""
    return "dense" if setting.is_dense else setting.method


def make_eval_cache(setting: SparsityConfig, queries: dict | None = None, pads: list[int] | None = None):
    """``DynamicCache`` (dense), ``MustafarCache`` (per-token) or ``SimulatedCache`` (other methods).

    ``pads``: left padding per batch row (a ``MustafarCache`` reads it from the prefill mask instead).
    """
    if setting.is_dense or setting.method == "per-token":
        return make_cache(setting)
    return SimulatedCache(setting, queries, pads)


def _needs_queries(setting: SparsityConfig) -> bool:
    return setting.method in ("output-aware", "think") and not setting.is_dense


def _key(task: str, setting: SparsityConfig, length: int, index: int, seed: int):
    return task, setting.name, method_label(setting), length, index, seed


def _prefill(model, input_ids, todo: list[SparsityConfig]):
    """Dense prefill; with the observation queries when a run needs them. Returns (source, logits, queries, s)."""
    start = time.perf_counter()
    observing = any(_needs_queries(s) for s in todo)
    with observe_queries(model, max(1, todo[0].window)) if observing else nullcontext({}) as queries:
        source, logits = prefill(model, input_ids)
    return source, logits, queries, time.perf_counter() - start


def _pad_id(model, tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
    return pad if pad is not None else min(eos_ids(model, tokenizer), default=0)


def _run_batch(model, tokenizer, jobs: list[Job], config: EvalConfig, store: ResultStore, bar) -> None:
    """Prefill ``jobs`` once as one left-padded batch; decode it under every (method, setting) not yet stored."""
    runs = run_configs(config)
    keys = {id(job): {s: _key(job.task, s, job.context_length, job.index, config.seed) for s in runs} for job in jobs}
    todo = [s for s in runs if any(keys[id(job)][s] not in store for job in jobs)]
    bar.update(sum(key in store for job in jobs for key in keys[id(job)].values()))
    if not todo:
        return
    batch = left_pad([job.input_ids for job in jobs], _pad_id(model, tokenizer))
    start = time.perf_counter()
    observing = any(_needs_queries(s) for s in todo)
    source, logits, queries = batched_prefill(model, batch, max(1, todo[0].window) if observing else None)
    prefill_s = (time.perf_counter() - start) / len(jobs)
    eos = eos_ids(model, tokenizer)
    stops = [lambda t, job=job: job.done(tokenizer.decode(t, skip_special_tokens=True)) for job in jobs]
    for setting in todo:
        bar.set_postfix_str(f"{jobs[0].task} {jobs[0].context_length} x{len(jobs)} {method_label(setting)} "
                            f"{setting.name}")
        start = time.perf_counter()
        cache = fill_batch(make_eval_cache(setting, queries, batch.pads), source, batch)
        nbytes: dict[int, tuple[int, int]] = {}
        outputs = batched_greedy(model, cache, logits, batch, [job.max_new_tokens for job in jobs], eos, stops,
                                 on_done=lambda row, fed: nbytes.__setitem__(row, _row_bytes(cache, batch, row, fed)))
        seconds = (time.perf_counter() - start) / len(jobs)
        for row, (job, tokens) in enumerate(zip(jobs, outputs)):
            if keys[id(job)][setting] in store:
                continue
            _store_sample(store, job, setting, tokenizer.decode(tokens, skip_special_tokens=True), len(tokens),
                          nbytes[row] if row in nbytes else _row_bytes(cache, batch, row, max(0, len(tokens) - 1)),
                          seconds, prefill_s, config.seed, isinstance(cache, SimulatedCache))
            bar.update()


def _run_length(model, tokenizer, todo: list[Job], config: EvalConfig, store: ResultStore, bar) -> None:
    """Every job of one context length, all tasks together, in batches of similar prompt lengths.

    Jobs already finished under every (method, setting) are counted and left out of the batches.
    """
    runs = run_configs(config)
    done = [all(_key(j.task, s, j.context_length, j.index, config.seed) in store for s in runs) for j in todo]
    bar.update(len(runs) * sum(done))
    todo = [job for job, finished in zip(todo, done) if not finished]
    if not todo:
        return
    size = config.batch_size or auto_batch_size(model, max(job.input_ids.shape[1] for job in todo))
    for group in length_batches([job.input_ids.shape[1] for job in todo], size):
        _run_batch(model, tokenizer, [todo[i] for i in group], config, store, bar)


def _row_bytes(cache, batch, row: int, fed: int) -> tuple[int, int]:
    """``(held, dense)`` KV bytes of batch row ``row`` when it stopped, ``fed`` tokens after its prompt.

    Those of that prompt alone after the same tokens: dense bytes at the batch's bytes per token
    (it holds ``width + fed`` per row, padding included); held bytes of a ``MustafarCache`` from the
    rule (:func:`~.batched.alone_nbytes`: a padded batch's store stops at its smallest row boundary,
    so its own split is not the row's); other caches hold their dense bytes.
    """
    kv = kv_bytes(cache)
    width = batch.input_ids.shape[1]
    tokens = width - batch.pads[row] + fed
    dense = round(kv.dense * tokens / (batch.rows * (width + fed)))
    return (alone_nbytes(cache, tokens) if isinstance(cache, MustafarCache) else dense), dense


def _store_sample(store, job: Job, setting: SparsityConfig, output: str, new_tokens: int, nbytes: tuple[int, int],
                  seconds: float, prefill_s: float, seed: int, simulated: bool) -> None:
    score = job.score(output)
    store.append(SampleResult(
        setting.name, job.task, job.context_length, job.index, job.input_ids.shape[1], nbytes[0], nbytes[1],
        seconds, job.depth, job.references[0], output, bool(score == 1.0) if job.suite != "longbench" else None,
        extra={"prefill_s": prefill_s, "new_tokens": new_tokens, **job.meta}, method=method_label(setting),
        simulated=simulated, seed=seed, score=score, suite=job.suite, references=list(job.references)))


def _perplexity(model, token_ids, config: EvalConfig, length: int, store: ResultStore, bar) -> None:
    runs = run_configs(config)
    for index, window in enumerate(text_windows(token_ids, length, config.ppl_windows)):
        todo = [s for s in runs if _key("ppl", s, length, index, config.seed) not in store]
        bar.update(len(runs) - len(todo))
        if not todo:
            continue
        prefix, continuation = window[:, : length - config.ppl_tokens], window[:, length - config.ppl_tokens:]
        source, logits, queries, prefill_s = _prefill(model, prefix, todo)
        for setting in todo:
            bar.set_postfix_str(f"ppl {length} #{index} {method_label(setting)} {setting.name}")
            start = time.perf_counter()
            cache = fill_cache(make_eval_cache(setting, queries), source)
            result = score_continuation(model, cache, logits, continuation, config.ppl_chunk)
            kv = kv_bytes(cache)
            held, dense = kv.held, kv.dense
            store.append(SampleResult(
                setting.name, "ppl", length, index, length, held, dense, time.perf_counter() - start,
                nll=result.nll, scored_tokens=result.tokens, extra={"prefill_s": prefill_s},
                method=method_label(setting), simulated=isinstance(cache, SimulatedCache), seed=config.seed,
                suite="ppl"))
            bar.update()


def task_jobs(tokenizer, config: EvalConfig, task: str, length: int, text: str | None) -> list[Job]:
    """The generation jobs of ``task`` at context ``length`` under ``config`` (``text``: from :func:`prepare_text`)."""
    cap = config.max_new_tokens_cap
    if task in RULER_TASKS:
        return ruler_jobs(tokenizer, task, length, config.samples, config.seed, text, cap)
    if task in LONGBENCH_TASKS:
        return longbench_jobs(tokenizer, task, length, config.samples, config.data_dir, config.hub, cap)
    if task == "passkey":
        samples = passkey_samples(tokenizer, length, config.samples, config.seed, config.depths)
    else:
        needles = 1 if task == "niah" else config.num_needles
        samples = niah_samples(tokenizer, length, config.samples, config.seed, config.depths, num_needles=needles,
                               text=text)
    tokens = config.max_new_tokens if cap is None else min(cap, config.max_new_tokens)
    return retrieval_jobs(samples, tokenizer, tokens)


def _units(config: EvalConfig, token_ids, jobs_per_task: dict) -> int:
    per_run = sum(len(jobs) for jobs in jobs_per_task.values())
    if "ppl" in config.tasks:
        per_run += sum(len(text_windows(token_ids, n, config.ppl_windows)) for n in config.context_lengths)
    return per_run * len(run_configs(config))


def prepare_text(config: EvalConfig, tokenizer) -> tuple[str | None, object]:
    """``(text, token_ids)``: ``config``'s text (``None``: each task's default) and, with ``ppl``, its token ids.

    Checks what needs no model, so that a caller can run it before loading one: the text file, its
    length in tokens against every context length (``ppl``), its words (RULER tasks).

    Raises:
        FileNotFoundError / IsADirectoryError: ``text_file`` missing or a directory.
        ValueError: a text too short (characters, or tokens for a context length) or too poor in words.
    """
    text = load_text(config.text_file) if config.text_file or "ppl" in config.tasks else None
    if text is not None and any(t in RULER_TASKS for t in config.tasks) and len(word_pool(text)) < _RULER_MIN_WORDS:
        raise ValueError(f"text_file must hold at least {_RULER_MIN_WORDS} distinct words for RULER tasks, got "
                         f"{len(word_pool(text))}")
    token_ids = tokenizer(text, return_tensors="pt").input_ids[0] if "ppl" in config.tasks else None
    for length in config.context_lengths if token_ids is not None else ():
        text_windows(token_ids, length, 1)
    return text, token_ids


def run_eval(model, tokenizer, config: EvalConfig, progress: bool = True,
             store: ResultStore | None = None, prepared: tuple | None = None) -> list[SampleResult]:
    """Run ``config`` on ``model``/``tokenizer`` (from :func:`mustafar.load_model`); one result per run.

    ``store``: where finished runs are appended and looked up (resume); default an in-memory store.
    ``prepared``: :func:`prepare_text`'s result for ``config`` and this tokenizer when the caller already made it
    (the text is then not read and tokenised again).
    Returns the results of ``config``'s runs (those found in ``store`` included), in run order.

    Raises:
        ValueError: the perplexity text is shorter than a context length, or a task's data are bad.
        FileNotFoundError: a text file or LongBench file is missing.
    """
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(config).__name__}")
    store = store if store is not None else ResultStore(None)
    text, token_ids = prepare_text(config, tokenizer) if prepared is None else prepared
    jobs = {(task, n): task_jobs(tokenizer, config, task, n, text) for n in config.context_lengths
            for task in config.tasks if task != "ppl"}
    with tqdm(total=_units(config, token_ids, jobs), desc="mustafar eval", unit="run", disable=not progress) as bar:
        for length in config.context_lengths:
            if "ppl" in config.tasks:
                _perplexity(model, token_ids, config, length, store, bar)
            _run_length(model, tokenizer, [j for t in config.tasks if t != "ppl" for j in jobs[t, length]], config,
                        store, bar)
    return _collect(config, store, jobs, token_ids)


def _collect(config: EvalConfig, store: ResultStore, jobs: dict, token_ids) -> list[SampleResult]:
    """The stored results of every run of ``config``, in run order."""
    def indices(task: str, length: int):
        if task == "ppl":
            return range(len(text_windows(token_ids, length, config.ppl_windows)))
        return [job.index for job in jobs[task, length]]

    keys = [_key(task, setting, length, index, config.seed) for length in config.context_lengths
            for task in config.tasks for index in indices(task, length) for setting in run_configs(config)]
    return [store.get(key) for key in keys if key in store]
