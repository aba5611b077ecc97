"""Capacity: the largest batch whose prefill and a few decode steps fit in a memory budget.

Search (:func:`find_max_batch`): batch 1, 2, 4, ... while the probe fits, then
bisection between the last batch that fit and the first that did not. A probe
(:func:`make_probe`) starts from a fresh state (garbage collected, allocator
cache emptied, peak counter reset), caps the caching allocator at the budget
(``torch.cuda.set_per_process_memory_fraction``, so that a probe over the
budget fails at its first allocation beyond it instead of running on), builds a
cache, prefills random prompts and decodes a few steps eagerly at ``batch``. With
``prefill="one"`` (the default of ``generate`` mode) it prefills one sequence and
repeats its cache to ``batch`` rows (``batch_repeat_interleave``, as beam search
does): the cache's bytes do not depend on the tokens, and the prefill's
activations are then those of one sequence, as in a serving engine that
prefills sequences one at a time or in chunks; otherwise (``"batch"``, and
always in ``graph`` mode, whose static caches are sized for the batch) the
whole batch is prefilled at once, and its activations can bound the batch
before the cache does. Without device memory counters (a CPU) a batch fits when
its prediction is within the budget, with no slack, and the probe says so. It
fits when it raised no out-of-memory error and the peak allocated bytes
(weights included) stayed within the budget. A batch predicted
(:mod:`mustafar.bench.memory`) above ``budget * (1 + slack)`` counts as not
fitting without running.

The probe is injectable, so the search is tested without a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..generation import make_cache
from .decode import DecodeStep, first_tokens
from .memory import gib, predict_bytes
from .models import model_dims, weight_bytes
from .timing import Clock

__all__ = ["Probe", "find_max_batch", "make_probe", "oom_reason", "PREFILLS", "prefill_kind"]

#: How a probe prefills: ``"one"`` sequence repeated to the batch, or the whole ``"batch"`` at once.
PREFILLS = ("one", "batch")

#: Characters of an unrecognised out-of-memory message kept in a reason.
_REASON_CHARS = 200


@dataclass(frozen=True)
class Probe:
    """One capacity probe: ``batch``, whether it ``fits``, the ``peak_bytes`` (None if not run), the ``reason``."""

    batch: int
    fits: bool
    peak_bytes: int | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def find_max_batch(probe: Callable[[int], Probe], max_batch: int = 4096) -> tuple[int, list[Probe]]:
    """Largest batch in ``[1, max_batch]`` for which ``probe(batch).fits`` (0 if none), and the probes run.

    Doubling from 1, then bisection; ``probe`` must be monotone (a batch that
    fits implies every smaller one fits). About ``2 * log2(answer)`` probes.

    Raises:
        ValueError: ``max_batch`` < 1.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    probes: list[Probe] = []

    def fits(batch: int) -> bool:
        probes.append(probe(batch))
        return probes[-1].fits

    good, bad = 0, max_batch + 1
    batch = 1
    while batch <= max_batch and fits(batch):
        good, batch = batch, batch * 2
    bad = min(batch, bad)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, probes


def prefill_kind(mode: str, prefill: str) -> str:
    """The prefill a probe of ``mode`` really runs: ``prefill`` (one of :data:`PREFILLS`), ``"batch"`` in graph mode.

    Raises:
        ValueError: ``prefill`` not in :data:`PREFILLS`.
    """
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    return "batch" if mode == "graph" else prefill


def make_probe(model, setting, mode: str, prompt: int, budget_bytes: int, steps: int, seed: int = 0,
               slack: float = 0.25, backend: str = "auto", prefill: str = "one") -> Callable[[int], Probe]:
    """A probe ``batch -> Probe`` for ``model`` on its (CUDA) device; see the module docstring.

    Args:
        setting: a :class:`mustafar.SparsityConfig`; mode: ``"generate"`` or ``"graph"`` (its caches).
        prompt: prompt tokens; steps: eager decode steps after the prefill.
        budget_bytes: the memory budget, weights included.
        slack: run a batch only if predicted <= ``budget * (1 + slack)``.
        prefill: ``"one"`` or ``"batch"`` (see the module docstring; graph mode always ``"batch"``).

    Raises:
        ValueError: ``prefill`` not in :data:`PREFILLS`.
    """
    clock = Clock(model.device)
    dims, weights = model_dims(model.config), weight_bytes(model)
    one = prefill_kind(mode, prefill) == "one"

    def probe(batch: int) -> Probe:
        predicted = weights + predict_bytes(dims, setting, mode, batch, prompt, steps + 1, model.dtype,
                                            prefill_batch=1 if one else None)["total"]
        # without device memory counters (a CPU) the prediction is all there is: no slack then
        if predicted > budget_bytes * (1 + (slack if clock.cuda else 0)):
            return Probe(batch, False, None, f"predicted {gib(predicted)} > budget {gib(budget_bytes)}")
        probe_result = _run_probe(model, setting, mode, batch, prompt, steps, budget_bytes, seed, clock, backend, one)
        if probe_result.peak_bytes is None and probe_result.fits:
            return Probe(batch, True, None, f"predicted {gib(predicted)} <= budget (not measured: no device memory "
                                            f"counters on {model.device.type})")
        return probe_result

    return probe


def oom_reason(error: BaseException) -> str:
    """``'out of memory (tried to allocate 14.00 GiB)'`` from a ``torch.cuda.OutOfMemoryError``."""
    match = re.search(r"[Tt]ried to allocate ([\d.]+ \w+)", str(error))
    return f"out of memory (tried to allocate {match[1]})" if match else f"out of memory: {str(error)[:_REASON_CHARS]}"


def _run_probe(model, setting, mode, batch, prompt, steps, budget_bytes, seed, clock, backend, one) -> Probe:
    clock.fresh()
    total = clock.total_bytes()
    if clock.cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), model.device)
    error = ""
    try:
        _prefill_and_decode(model, setting, mode, batch, prompt, steps, seed, backend, one)
    except torch.cuda.OutOfMemoryError as oom:
        error = oom_reason(oom)
    finally:
        if clock.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, model.device)
    peak = clock.peak_bytes()
    clock.fresh()
    if error:
        return Probe(batch, False, peak, error)
    fits = peak is None or peak <= budget_bytes
    return Probe(batch, fits, peak, "" if fits else f"peak {gib(peak)} > budget {gib(budget_bytes)}")


@torch.inference_mode()
def _prefill_and_decode(model, setting, mode, batch, prompt, steps, seed, backend, one) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = 1 if one else batch
    ids = torch.randint(model.config.vocab_size, (rows, prompt), generator=generator).to(model.device)
    cache = make_cache(setting, mode, model=model, batch=rows, max_tokens=prompt + steps + 1, backend=backend)
    first = first_tokens(model, cache, ids)
    del ids
    if one and batch > 1:
        cache.batch_repeat_interleave(batch)
        first = first.repeat_interleave(batch, dim=0)
    step = DecodeStep(model, cache, first, prompt, steps)
    for _ in range(steps):
        step()
    Clock(model.device).sync()
