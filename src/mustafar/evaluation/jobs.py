"""Generation jobs: one tokenised prompt with its references, generation length, stop rule and metric.

Every generation task of every suite becomes a list of :class:`Job`; the runner
prefills each job once and decodes it under every (method, setting). Suites:

- ``retrieval``: passkey, niah, niah-multikey (:mod:`.tasks`), first number checked;
- ``ruler``: the RULER tasks (:mod:`.ruler`), ``string_match_all``;
- ``longbench``: LongBench tasks (:mod:`.longbench`), each with its metric (:mod:`.metrics`).

Stop rules end greedy decoding early only where later tokens cannot change the
score: ``all-references`` (every reference already found: string match can only
stay at 1), ``first-line`` (LongBench scores only the first line), ``code-line``
(LongBench's code metric reads only the first complete line without a comment),
``number`` (retrieval reads the first number). ``none`` decodes to the end of the
reply (end-of-sequence token) or ``max_new_tokens``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..generation import chat_input_ids
from .longbench import MAX_NEW_TOKENS, build_input_ids, load_longbench
from .metrics import FIRST_LINE_TASKS, longbench_score, string_match_all
from .ruler import ruler_samples
from .tasks import check_answer

__all__ = ["Job", "retrieval_jobs", "ruler_jobs", "longbench_jobs", "STOP_RULES"]

_ANSWER_DONE = re.compile(r"\d[^\d,]")
STOP_RULES = ("none", "number", "all-references", "first-line", "code-line")


@dataclass(frozen=True)
class Job:
    """One prompt ``input_ids [1, n]`` (int64) to answer; ``references``: the expected answers."""

    suite: str
    task: str
    index: int
    context_length: int
    input_ids: torch.Tensor
    references: tuple[str, ...]
    max_new_tokens: int
    stop: str = "none"
    depth: float | None = None
    all_classes: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict)

    def score(self, output: str) -> float:
        """The task's metric of ``output`` against :attr:`references`, in [0, 1]."""
        if self.suite == "retrieval":
            return float(check_answer(output, self.references[0]))
        if self.suite == "ruler":
            return string_match_all(output, self.references)
        return longbench_score(self.task, output, self.references, self.all_classes)

    def done(self, output: str) -> bool:
        """True when decoding may stop: more tokens cannot change :meth:`score` (see the module docstring)."""
        if self.stop == "number":
            return _ANSWER_DONE.search(output) is not None
        if self.stop == "all-references":
            return string_match_all(output, self.references) == 1.0
        if self.stop == "first-line":
            return "\n" in output.lstrip("\n")
        if self.stop == "code-line":
            complete = output.lstrip("\n").split("\n")[:-1]  # lines already ended by a newline
            return any("`" not in line and "#" not in line and "//" not in line for line in complete)
        return False


def _cap(standard: int, cap: int | None) -> int:
    return standard if cap is None else min(standard, cap)


def retrieval_jobs(samples, tokenizer, max_new_tokens: int) -> list[Job]:
    """Jobs of passkey / niah samples (:class:`~.tasks.Sample`): first number must be the answer."""
    return [Job("retrieval", s.task if not s.task.startswith("niah-multikey") else "niah-multikey", s.index,
                s.context_length, chat_input_ids(tokenizer, s.prompt, s.answer_prefix), (s.answer,), max_new_tokens,
                "number", s.depth, meta={"key": s.key, "needles": len(s.needles)}) for s in samples]


def ruler_jobs(tokenizer, task: str, context_length: int, n: int, seed: int, text: str | None,
               cap: int | None = None) -> list[Job]:
    """Jobs of ``n`` RULER samples (:func:`~.ruler.ruler_samples`); generation capped at ``cap`` tokens if given."""
    return [Job("ruler", task, s.index, context_length, chat_input_ids(tokenizer, s.prompt, s.answer_prefix),
                s.answers, _cap(s.max_new_tokens, cap), "all-references", meta=s.meta)
            for s in ruler_samples(tokenizer, task, context_length, n, seed, text)]


def longbench_jobs(tokenizer, task: str, max_length: int, n: int, data_dir: str | None, hub: bool = False,
                   cap: int | None = None) -> list[Job]:
    """Jobs of the first ``n`` records of LongBench ``task``, prompts middle-truncated to ``max_length`` tokens."""
    stop = "first-line" if task in FIRST_LINE_TASKS else "code-line" if task in ("lcc", "repobench-p") else "none"
    jobs = []
    for index, record in enumerate(load_longbench(task, data_dir, hub, limit=n)):
        classes = record.get("all_classes")
        jobs.append(Job("longbench", task, index, max_length, build_input_ids(tokenizer, task, record, max_length),
                        tuple(record["answers"]), _cap(MAX_NEW_TOKENS[task], cap), stop,
                        all_classes=tuple(classes) if classes else None,
                        meta={"length": record.get("length"), "dataset": record.get("dataset")}))
    return jobs
