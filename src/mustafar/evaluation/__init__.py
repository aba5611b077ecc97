"""Accuracy and memory evaluation of sparse KV caches on real models.

Modules: :mod:`.texts` (offline English text), :mod:`.tasks` (passkey and
needle-in-a-haystack generators, haystack helpers), :mod:`.ruler` and
:mod:`.ruler_words` (RULER synthetic tasks, arXiv 2404.06654), :mod:`.longbench`
(LongBench data, prompts, truncation, arXiv 2308.14508), :mod:`.metrics`
(RULER and LongBench scoring), :mod:`.simulate` (simulated pruning for methods the
compressed cache cannot store), :mod:`.jobs` (prompts to answer), :mod:`.perplexity`,
:mod:`.config` (:class:`EvalConfig`), :mod:`.results` (per-sample results, resumable
store), :mod:`.runner` (the loop), :mod:`.report` and :mod:`.plots` (tables, JSON, PNG).
"""

from .config import GROUPS, TASKS, EvalConfig, expand_tasks
from .results import ResultStore, SampleResult
from .runner import run_eval

__all__ = ["EvalConfig", "SampleResult", "ResultStore", "run_eval", "expand_tasks", "TASKS", "GROUPS"]
