"""Accuracy and memory evaluation of sparse KV caches on real models.

Modules: :mod:`.texts` (offline English text), :mod:`.tasks` (passkey and
needle-in-a-haystack generators, answer checker), :mod:`.perplexity`
(perplexity through the cache), :mod:`.runner` (the loop over settings, tasks,
context lengths and samples), :mod:`.report` (table, JSON, plot).
"""

from .runner import TASKS, EvalConfig, SampleResult, run_eval

__all__ = ["EvalConfig", "SampleResult", "run_eval", "TASKS"]
