"""Run the benchmark grid (or the capacity search) and write the results.

For every (batch, prompt) of the grid, every mode and every setting, one case:
a fresh cache, random prompts (seeded by ``seed``, the same for every setting),
a timed prefill (time to first token, median of ``ttft_repeats``), ``new_tokens``
greedy tokens through eager ``generate()`` or the graph-captured loop, then the
breakdown of one step (:mod:`mustafar.bench.breakdown`). Before a case runs,
its memory is predicted (:mod:`mustafar.bench.memory`); a case that does not fit
(predicted, or an out-of-memory error) is a result too, recorded with its reason.
A sparse case runs whether or not its dense counterpart fitted.

Example::

    >>> from mustafar.bench import run_bench
    >>> result = run_bench(shape="tiny", batches=(1,), prompts=(64,), new_tokens=4, window=8, chunk=16,
    ...                    device="cpu", out=None)
    >>> sorted({(row["mode"], row["setting"], row["status"]) for row in result["rows"]})[:2]
    [('generate', 'K0.5V0.5', 'ok'), ('generate', 'K0.7V0.7', 'ok')]
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from .breakdown import step_breakdown
from ..generation import kv_bytes, make_cache
from .capacity import find_max_batch, make_probe, oom_reason, predicted_max_batch, prefill_kind
from .config import BenchConfig
from .decode import first_tokens, generate_decode, graph_decode
from .memory import gib, predict_bytes
from .models import build_model, model_dims, weight_bytes
from .report import ALLOC_CONF, environment, summary_line, write_results
from .timing import Clock

__all__ = ["run_bench", "run_capacity"]

_GIB = 2**30
#: SDPA backends of ``generate`` decode steps unless ``generate_cudnn`` (see :class:`BenchConfig`).
_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _Context:
    """The model and the device of a run, shared by its cases."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None]):
        self.config, self.log = config, log
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.clock = Clock(device)
        cuda_dtype = "bfloat16" if config.weights == "int4" else "float16"  # int4: tinygemm needs bfloat16
        dtype = config.dtype or (cuda_dtype if self.clock.cuda else "float32")
        self.model = build_model(config.shape, config.layers, dtype, device, weights=config.weights)
        self.dims, self.weights = model_dims(self.model.config), weight_bytes(self.model)

    def available_bytes(self) -> int | None:
        """Bytes a case may use beyond the weights (None: unknown, e.g. on a CPU without a limit)."""
        free = self.clock.free_bytes()
        if self.config.memory_limit_bytes is None:
            return free
        limited = self.config.memory_limit_bytes - self.weights
        return limited if free is None else min(free, limited)

    def prompt(self, batch: int, length: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(self.dims["vocab"], (batch, length), generator=generator)
        return ids.to(self.model.device)


def _skip(row: dict, reason: str) -> dict:
    return {**row, "status": "skipped", "reason": reason}


def _fits(ctx: _Context, row: dict, setting) -> str | None:
    """The reason a case cannot run, or None."""
    predicted = predict_bytes(ctx.dims, setting, row["mode"], row["batch"], row["prompt"],
                              ctx.config.new_tokens, ctx.model.dtype, chunk=ctx.config.prefill_chunk,
                              random_fill=ctx.config.random_fill)["total"]
    row["predicted_bytes"] = predicted
    available = ctx.available_bytes()
    row["available_bytes"] = available
    if available is not None and predicted > available:
        kind = "dense" if setting.is_dense else setting.name
        return f"does not fit ({kind}): predicted {gib(predicted)} > {gib(available)} available"
    if row["mode"] == "graph" and not setting.is_dense and not _static_sparse_available():
        return "StaticMustafarCache is not available in this build of mustafar"
    return None


def _static_sparse_available() -> bool:
    try:
        from ..cache import StaticMustafarCache  # noqa: F401
    except ImportError:
        return False
    return True


def _ttft_ms(ctx: _Context, mode: str, setting, ids: torch.Tensor, max_tokens: int) -> list[float]:
    """Extra prefill timings (fresh caches) beyond the case's own, while prefills are short."""
    times: list[float] = []
    for _ in range(ctx.config.ttft_repeats - 1):
        cache = make_cache(setting, mode, model=ctx.model, batch=ids.shape[0], max_tokens=max_tokens,
                           backend=ctx.config.backend)
        with torch.inference_mode():
            times.append(ctx.clock.wall_ms(lambda: first_tokens(ctx.model, cache, ids, ctx.config.prefill_chunk))[1])
        del cache
    return times


def _run(ctx: _Context, row: dict, setting, ids: torch.Tensor) -> dict:
    config, clock, model = ctx.config, ctx.clock, ctx.model
    # room for the generated tokens, the breakdown's extra step and the eviction it times (the next step's)
    mode, batch, max_tokens = row["mode"], row["batch"], row["prompt"] + config.new_tokens + 1
    clock.fresh()
    cache = make_cache(setting, mode, model=model, batch=batch, max_tokens=max_tokens, backend=config.backend)

    def breakdown(step, step_ms, captured):
        return step_breakdown(model, cache, setting, batch, step, step_ms, clock, captured, config.op_repeats)

    if mode == "graph":
        tokens, timings = graph_decode(model, cache, ids, config.new_tokens, config.capture, config.warmup_steps,
                                       breakdown, prefill_chunk=config.prefill_chunk, random_fill=config.random_fill)
    else:
        backends = None if config.generate_cudnn or not clock.cuda else _NOT_CUDNN
        tokens, timings = generate_decode(model, cache, ids, config.new_tokens, breakdown, backends,
                                          prefill_chunk=config.prefill_chunk, random_fill=config.random_fill)
    peak = clock.peak_bytes()
    kv = kv_bytes(cache)
    del cache, tokens
    ttfts = [] if config.random_fill else [timings.prefill_ms]
    if ttfts and timings.prefill_ms < config.ttft_repeat_below_ms:
        ttfts += _ttft_ms(ctx, mode, setting, ids, max_tokens)
    result = {**row, "status": "ok", "reason": "", "ttft_ms": statistics.median(ttfts) if ttfts else None,
              "ttft_ms_all": ttfts, "fill": "random" if config.random_fill else "prefill",
              **timings.to_dict(), "peak_bytes": peak, "kv_bytes": kv.held, "kv_dense_bytes": kv.dense,
              "kv_allocated_bytes": kv.allocated, "kv_ratio": kv.ratio}
    return result


def run_case(ctx: _Context, mode: str, setting, batch: int, prompt: int) -> dict:
    """One case of the grid as a result row (status ``ok`` or ``skipped`` with the reason)."""
    row = {"mode": mode, "setting": setting.name, "batch": batch, "prompt": prompt}
    reason = _fits(ctx, row, setting)
    if reason:
        return _skip(row, reason)
    error = ""
    try:
        return _run(ctx, row, setting, ctx.prompt(batch, prompt))
    except torch.cuda.OutOfMemoryError as oom:
        error = oom_reason(oom)
    ctx.clock.fresh()
    kind = "dense" if setting.is_dense else setting.name
    return _skip(row, f"does not fit ({kind}): {error}")


def _warm_up(ctx: _Context) -> None:
    """One small untimed case per (mode, setting): kernel compilation and autotuning happen here."""
    config = ctx.config
    length = min(min(config.prompts), config.window + config.chunk + config.new_tokens)
    for mode in config.modes:
        for setting in config.sparsity:
            run_case(ctx, mode, setting, 1, length)


def run_grid(ctx: _Context) -> list[dict]:
    """Every case of the grid, smallest batch x prompt first."""
    config, rows = ctx.config, []
    if config.warmup:
        _warm_up(ctx)
    for batch, prompt in sorted(((b, p) for b in config.batches for p in config.prompts), key=lambda c: c[0] * c[1]):
        for mode in config.modes:
            for setting in config.sparsity:
                rows.append(run_case(ctx, mode, setting, batch, prompt))
                ctx.log(summary_line(rows[-1]))
    return rows


def run_capacity(ctx: _Context, probe_factory=None) -> list[dict]:
    """Capacity rows, one per (mode, prompt): the largest batch per setting and the ratio to dense.

    ``probe_factory(setting, mode, prompt, budget_bytes) -> probe`` replaces
    :func:`mustafar.bench.capacity.make_probe` (tests use a fake memory model).
    """
    config = ctx.config
    budget = int(config.budget_gib * _GIB) if config.budget_gib else (config.memory_limit_bytes
                                                                     or ctx.clock.total_bytes())
    if budget is None:
        raise ValueError("budget_gib must be given on a device without a known memory size (e.g. a CPU)")
    factory = probe_factory or (lambda setting, mode, prompt, budget_bytes: make_probe(
        ctx.model, setting, mode, prompt, budget_bytes, config.capacity_steps, config.seed, config.capacity_slack,
        config.backend, config.capacity_prefill, config.prefill_chunk))
    rows = []
    for mode in config.modes:
        for prompt in config.prompts:
            row = {"mode": mode, "prompt": prompt, "budget_bytes": budget,
                   "prefill": prefill_kind(mode, config.capacity_prefill), "prefill_chunk": config.prefill_chunk,
                   "settings": {}}
            for setting in config.sparsity:
                start = predicted_max_batch(ctx.model, setting, mode, prompt, budget, config.capacity_steps,
                                            config.capacity_prefill, config.prefill_chunk, config.max_batch)
                best, probes = find_max_batch(factory(setting, mode, prompt, budget), config.max_batch, start)
                measured = all(p.peak_bytes is not None for p in probes if p.fits)
                row["settings"][setting.name] = {"max_batch": best, "measured": measured, "predicted_max_batch": start,
                                                 "hit_max_batch": best == config.max_batch,
                                                 "probes": [p.to_dict() for p in probes]}
                notes = ([] if measured else ["predicted, not measured"]) + (
                    [f"the search's ceiling max_batch={config.max_batch}"] if best == config.max_batch else [])
                ctx.log(f"capacity {mode} prompt {prompt} {setting.name}: max batch {best} "
                        f"within {gib(budget)} ({len(probes)} probes{''.join('; ' + n for n in notes)})")
            dense = row["settings"].get("dense", {}).get("max_batch")
            row["ratio_to_dense"] = {name: (s["max_batch"] / dense if dense else None)
                                     for name, s in row["settings"].items()}
            rows.append(row)
    return rows


def _expandable_segments(config: BenchConfig, log: Callable[[str], None]) -> None:
    """Ask for expandable allocator segments (unless set otherwise) before CUDA starts.

    Large prefills then fit where fragmentation of fixed segments would fail them
    (seen: 28 GiB reserved but unallocated at batch 16 x 32k on Llama-3-8B).
    """
    uses_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if uses_cuda and ALLOC_CONF not in os.environ and not torch.cuda.is_initialized():
        os.environ[ALLOC_CONF] = "expandable_segments:True"
        log(f"set {ALLOC_CONF}=expandable_segments:True")


def run_bench(config: BenchConfig | None = None, out: str | Path | None = "mustafar-bench",
              log: Callable[[str], None] = print, command: str | None = None, probe_factory=None,
              **overrides) -> dict:
    """Run the benchmark (or, with ``capacity=True``, the capacity search) and write the results to ``out``.

    Args:
        config: a :class:`BenchConfig`; keyword ``overrides`` build or change it
            (``run_bench(shape="tiny", batches=(1,))``).
        out: directory for ``bench.json`` (or ``capacity.json``) and the PNG plots; None: write nothing.
        log: called with one line per case.
        command: recorded in the environment (default: ``sys.argv``).
        probe_factory: for the capacity search, see :func:`run_capacity`.

    Returns:
        ``{"environment": ..., "config": ..., "rows": [...]}`` (``"capacity"`` instead of
        ``"rows"`` in capacity mode), as written to the JSON file.

    Raises:
        TypeError / ValueError: a bad configuration (the message names the field).
    """
    config = (config or BenchConfig()).replace(**overrides) if overrides else (config or BenchConfig())
    _expandable_segments(config, log)
    ctx = _Context(config, log)
    env = environment(ctx.clock, ctx.model, command)
    result = {"environment": env, "config": config.to_dict()}
    if config.capacity:
        result["capacity"] = run_capacity(ctx, probe_factory)
    else:
        result["rows"] = run_grid(ctx)
    if out is not None:
        for path in write_results(Path(out), result, log):
            log(f"wrote {path}")
    return result
