"""Run the evaluation: every task x context length x sample x sparsity setting.

Each prompt (retrieval) or text window (perplexity) is prefilled once, densely
(prefill attention is dense in Mustafar, arXiv 2505.22913); its keys and values
then go into a fresh cache per setting (:func:`mustafar.generation.fill_cache`),
and every generated or scored token goes through decode steps that read that
cache. The KV bytes held and the dense bytes of the same tokens are read from
the cache after the last step.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .._checks import check_positive_int
from ..config import SparsityConfig
from ..generation import chat_input_ids, eos_ids, fill_cache, greedy_decode, kv_nbytes, make_cache, prefill
from .perplexity import score_continuation, text_windows
from .tasks import DEFAULT_DEPTHS, check_answer, niah_samples, passkey_samples
from .texts import load_text

__all__ = ["EvalConfig", "SampleResult", "run_eval", "TASKS", "RETRIEVAL_TASKS"]

#: Retrieval tasks (accuracy) and the perplexity task.
RETRIEVAL_TASKS = ("passkey", "niah", "niah-multikey")
TASKS = RETRIEVAL_TASKS + ("ppl",)
_ANSWER_DONE = re.compile(r"\d[^\d,]")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``context_lengths`` in tokens; ``samples`` per retrieval task and context length.

    ``ppl_tokens`` continuation tokens are scored in each of ``ppl_windows`` text
    windows, ``ppl_chunk`` tokens per decode forward; ``num_needles`` needles in
    ``niah-multikey``; ``max_new_tokens`` per retrieval answer.
    """

    settings: tuple[SparsityConfig, ...]
    tasks: tuple[str, ...] = TASKS
    context_lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 10
    seed: int = 0
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    num_needles: int = 4
    max_new_tokens: int = 12
    ppl_tokens: int = 256
    ppl_windows: int = 1
    ppl_chunk: int = 16
    text_file: str | None = None

    def __post_init__(self):
        if not self.settings or not all(isinstance(s, SparsityConfig) for s in self.settings):
            raise TypeError(f"settings must be a non-empty tuple of SparsityConfig, got {self.settings!r}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(self.tasks)}")
        if not self.context_lengths:
            raise ValueError("context_lengths must hold at least one length (tokens)")
        for length in self.context_lengths:
            check_positive_int("context_lengths", length, minimum=256)
        for name in ("samples", "max_new_tokens", "ppl_windows", "ppl_chunk", "num_needles"):
            check_positive_int(name, getattr(self, name))
        if not 1 <= self.ppl_tokens < min(self.context_lengths):
            raise ValueError(f"ppl_tokens must be in [1, min(context_lengths)), got {self.ppl_tokens}")


@dataclass
class SampleResult:
    """One (setting, task, context length, sample) run. Bytes are KV bytes over all layers."""

    setting: str
    task: str
    context_length: int
    index: int
    prompt_tokens: int
    kv_bytes: int
    dense_bytes: int
    seconds: float
    depth: float | None = None
    answer: str | None = None
    output: str | None = None
    correct: bool | None = None
    nll: float | None = None
    scored_tokens: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _samples(tokenizer, config: EvalConfig, task: str, length: int):
    if task == "passkey":
        return passkey_samples(tokenizer, length, config.samples, config.seed, config.depths)
    needles = 1 if task == "niah" else config.num_needles
    return niah_samples(tokenizer, length, config.samples, config.seed, config.depths, num_needles=needles)


def _retrieval(model, tokenizer, config: EvalConfig, task: str, length: int, bar) -> list[SampleResult]:
    results, eos = [], eos_ids(model, tokenizer)
    for sample in _samples(tokenizer, config, task, length):
        ids = chat_input_ids(tokenizer, sample.prompt, sample.answer_prefix)
        start = time.perf_counter()
        source, logits = prefill(model, ids)
        prefill_s = time.perf_counter() - start
        for setting in config.settings:
            bar.set_postfix_str(f"{task} {length} #{sample.index} {setting.name}")
            start = time.perf_counter()
            cache = fill_cache(make_cache(setting), source)
            tokens = greedy_decode(model, cache, logits, config.max_new_tokens, eos,
                                   stop=lambda t: _ANSWER_DONE.search(tokenizer.decode(t)) is not None)
            output = tokenizer.decode(tokens, skip_special_tokens=True)
            held, dense = kv_nbytes(cache)
            results.append(SampleResult(
                setting.name, task, length, sample.index, ids.shape[1], held, dense,
                time.perf_counter() - start, sample.depth, sample.answer, output, check_answer(output, sample.answer),
                extra={"prefill_s": prefill_s, "key": sample.key, "needles": len(sample.needles)}))
            bar.update()
        del source
    return results


def _perplexity(model, token_ids: torch.Tensor, config: EvalConfig, length: int, bar) -> list[SampleResult]:
    results = []
    for index, window in enumerate(text_windows(token_ids, length, config.ppl_windows)):
        prefix, continuation = window[:, : length - config.ppl_tokens], window[:, length - config.ppl_tokens :]
        start = time.perf_counter()
        source, logits = prefill(model, prefix)
        prefill_s = time.perf_counter() - start
        for setting in config.settings:
            bar.set_postfix_str(f"ppl {length} #{index} {setting.name}")
            start = time.perf_counter()
            cache = fill_cache(make_cache(setting), source)
            score = score_continuation(model, cache, logits, continuation, config.ppl_chunk)
            held, dense = kv_nbytes(cache)
            results.append(SampleResult(
                setting.name, "ppl", length, index, length, held, dense, time.perf_counter() - start,
                nll=score.nll, scored_tokens=score.tokens, extra={"prefill_s": prefill_s}))
            bar.update()
        del source
    return results


def run_eval(model, tokenizer, config: EvalConfig, progress: bool = True) -> list[SampleResult]:
    """Run ``config`` on ``model``/``tokenizer`` (from :func:`mustafar.load_model`); one result per run.

    Raises:
        ValueError: the perplexity text is shorter than a context length.
    """
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(config).__name__}")
    token_ids = None
    if "ppl" in config.tasks:
        text = load_text(config.text_file)
        token_ids = tokenizer(text, return_tensors="pt").input_ids[0]
        for length in config.context_lengths:
            text_windows(token_ids, length, 1)
    units = sum(config.samples if t != "ppl" else len(text_windows(token_ids, n, config.ppl_windows))
                for t in config.tasks for n in config.context_lengths)
    results: list[SampleResult] = []
    with tqdm(total=units * len(config.settings), desc="mustafar eval", unit="run", disable=not progress) as bar:
        for length in config.context_lengths:
            for task in config.tasks:
                if task == "ppl":
                    results += _perplexity(model, token_ids, config, length, bar)
                else:
                    results += _retrieval(model, tokenizer, config, task, length, bar)
    return results
