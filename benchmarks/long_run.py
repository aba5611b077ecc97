"""Long-run check of MustafarCache: many decode steps, memory as the format predicts, no creeping slowdown (issue 5).

Usage (repository root; a CUDA device is used when present, else the CPU):

    PYTHONPATH=src python benchmarks/long_run.py [--steps 20000] [--out DIR] [--dtype fp16] [--backend auto]

A random model of a tiny config (Llama architecture, no download) prefills a
prompt into a ``MustafarCache`` and decodes ``--steps`` greedy tokens one
forward at a time. Verdicts (printed, and written to ``long_run.json`` in ``--out``):

- **memory**: at every checkpoint ``cache.nbytes`` equals the format's formula
  (store of ``f(T)`` tokens at ``bytes_per_token`` for K and V, plus the dense
  window), ``cache.allocated_nbytes`` equals the store's capacity-doubling rule,
  and the memory really in use (CUDA: ``memory_allocated``; CPU: the bytes of
  every live tensor) grows by no more than the cache's allocation plus a
  constant slack; the attention's tensor links stay bounded.
- **time**: the step time at the end (context ``T``) against a step at the
  start's context, measured in alternation (so machine load hits both alike),
  stays below ``--margin`` times the growth the attention alone predicts (one
  layer's ``sparse_decode_attention`` at both lengths, in the same alternation,
  times the layers). The median of the last 10 % vs the first 10 % of the run
  is reported too. CUDA: wall time after a synchronisation; CPU: this thread's
  CPU time with torch on one thread, which other processes barely disturb.

The test suite runs this on the CPU with fewer steps (tests/test_bench_long_run.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import transformers

import mustafar
from mustafar import MustafarCache, bytes_per_token, dense_bytes_per_token
from mustafar.attention import linked_count
from mustafar.format import CAPACITY_GRANULE, GROWTH, BitmapKV
from mustafar.ops import sparse_decode_attention

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Memory beyond the cache's allocation that may appear during a run (logits, allocator rounding).
SLACK_BYTES = 4 << 20


def tiny_model(layers: int, head_dim: int, dtype: torch.dtype, device: str, hidden: int = 256, heads: int = 8):
    """A random Llama: ``heads`` query heads, 2 KV heads of ``head_dim``; ``"mustafar"`` attention."""
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                                      vocab_size=1024, max_position_embeddings=1 << 20, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="mustafar")
    return model.to(device=device, dtype=dtype).eval()


@functools.cache
def cache_arg(model_class: type) -> str:
    """``"cache"`` (transformers >= 5.18) or ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def step(model, cache, token: torch.Tensor) -> torch.Tensor:
    """One forward of ``token [b, n]``; returns the greedy next token ``[b, 1]``."""
    return model(token, **{cache_arg(type(model)): cache}).logits[:, -1:].argmax(-1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CapacityModel:
    """The store's capacity rule (:meth:`mustafar.BitmapKV.reserve`): geometric growth, in whole granules."""

    def __init__(self):
        self.capacity = 0

    def reserve(self, tokens: int) -> int:
        if tokens > self.capacity:
            self.capacity = -(-max(tokens, int(GROWTH * self.capacity)) // CAPACITY_GRANULE) * CAPACITY_GRANULE
        return self.capacity


def rule_stored(cache: MustafarCache, tokens: int) -> int:
    """Tokens in the store by the rule (no padding): whole chunks leaving ``window`` tokens dense."""
    return max(0, (tokens - cache.config.window) // cache.config.chunk) * cache.config.chunk


def expected_bytes(cache: MustafarCache, capacity: CapacityModel) -> dict:
    """The format's formulas for what ``cache`` holds and allocates at its length (the rule's token counts)."""
    held = allocated = 0
    tokens = cache.get_seq_length()
    stored = rule_stored(cache, tokens)
    capacity.reserve(stored)
    for layer in cache.layers:
        b, h, _, d = layer.keys.shape
        w, dtype = tokens - stored, layer.keys.dtype
        row = bytes_per_token(d, layer.key_sparsity, dtype) + bytes_per_token(d, layer.value_sparsity, dtype)
        window = 2 * w * dense_bytes_per_token(d, dtype)
        held += b * h * (stored * row + window)
        allocated += b * h * (capacity.capacity * row + window)
    return {"held": held, "allocated": allocated}


def live_bytes(device: torch.device, exclude: set[int]) -> int:
    """Bytes in use: CUDA ``memory_allocated``, or on the CPU the storages of every live tensor not in ``exclude``."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "cpu" and not tensor.is_meta:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def checkpoint(cache, capacity, device, exclude, base, slack=SLACK_BYTES) -> dict:
    """Memory figures of one checkpoint and whether they meet the formulas (``slack``: bytes allowed beyond)."""
    expected = expected_bytes(cache, capacity)
    in_use = live_bytes(device, exclude) - base
    return {"tokens": cache.get_seq_length(), "nbytes": cache.nbytes, "expected_nbytes": expected["held"],
            "allocated_nbytes": cache.allocated_nbytes, "expected_allocated": expected["allocated"],
            "in_use_beyond_cache": in_use - cache.allocated_nbytes, "links": linked_count(),
            "ok": cache.nbytes == expected["held"] and cache.allocated_nbytes == expected["allocated"]
            and in_use - cache.allocated_nbytes <= slack}


def decode_run(model, cache, prompt: torch.Tensor, steps: int, checkpoints: int, slack: int, clock) -> dict:
    """Prefill ``prompt``, decode ``steps`` tokens; per-step seconds and memory checkpoints."""
    device = prompt.device
    exclude = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    token, capacity = step(model, cache, prompt), CapacityModel()
    sync(device)
    base = live_bytes(device, exclude) - cache.allocated_nbytes
    every, times, marks = max(1, steps // checkpoints), [], []
    for i in range(steps):
        start = clock()
        token = step(model, cache, token)
        sync(device)
        times.append(clock() - start)
        capacity.reserve(rule_stored(cache, cache.get_seq_length()))
        if (i + 1) % every == 0 or i + 1 == steps:
            marks.append(checkpoint(cache, capacity, device, exclude, base, slack))
    return {"times": times, "checkpoints": marks, "token": token}


def attention_call(layer, q_heads: int, tokens: int):
    """A closure running one decode attention of ``layer``'s shape over ``tokens`` compressed tokens + its window."""
    batch, h, w, d = layer.keys.shape
    dtype, device = layer.keys.dtype, layer.keys.device
    query = torch.randn(batch, q_heads, 1, d, dtype=dtype, device=device)
    stores = [BitmapKV.empty(batch, h, d, s, dtype=dtype, device=device) for s in (layer.key_sparsity,
                                                                                   layer.value_sparsity)]
    for store in stores:
        store.append(torch.randn(batch, h, tokens, d, dtype=dtype, device=device))
    window = torch.randn(batch, h, max(w, 1), d, dtype=dtype, device=device)
    return lambda: sparse_decode_attention(query, *stores, window, window, backend=layer.backend)


def paired(model, long_cache, prompt, token, pairs: int, clock) -> dict:
    """Median seconds, alternated so that machine load hits all alike: a step on ``long_cache`` and on a fresh
    cache after ``prompt``, and one layer's decode attention at both their lengths."""
    short = MustafarCache.from_config(long_cache.config, backend=long_cache.backend)
    tokens = {"long": token, "short": step(model, short, prompt)}
    q_heads = model.config.num_attention_heads
    attention = {"attention_long": attention_call(long_cache.layers[0], q_heads, long_cache.get_seq_length()),
                 "attention_short": attention_call(long_cache.layers[0], q_heads, prompt.shape[1] + pairs // 2)}
    times = {name: [] for name in ("long", "short", *attention)}
    for _ in range(pairs):
        for name, values in times.items():
            start = clock()
            if name in attention:
                attention[name]()
            else:
                tokens[name] = step(model, long_cache if name == "long" else short, tokens[name])
            sync(prompt.device)
            values.append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_verdict(run: dict, medians: dict, layers: int, margin: float) -> dict:
    """Whether the end-of-run step time stays within ``margin`` x what the attention's growth predicts."""
    growth = max(0.0, medians["attention_long"] - medians["attention_short"]) * layers
    expected = 1.0 + growth / medians["short"]
    ratio = medians["long"] / medians["short"]
    tenth = max(1, len(run["times"]) // 10)
    first, last = statistics.median(run["times"][:tenth]), statistics.median(run["times"][-tenth:])
    return {"paired_long_step_s": medians["long"], "paired_short_step_s": medians["short"], "paired_ratio": ratio,
            "attention_long_s": medians["attention_long"], "attention_short_s": medians["attention_short"],
            "attention_growth_s": growth, "expected_ratio": expected, "margin": margin,
            "first_tenth_median_s": first, "last_tenth_median_s": last, "last_over_first": last / first,
            "ok": ratio <= margin * expected}


def run(steps=20000, layers=4, head_dim=128, dtype="fp16", batch=1, prompt=64, window=32, chunk=256,
        sparsity=0.5, backend="auto", margin=1.5, pairs=200, checkpoints=10, device=None, cache=None,
        hidden=256, heads=8, slack=SLACK_BYTES) -> dict:
    """Run the check; returns the results with ``memory_ok``, ``time_ok`` and ``ok``. ``cache``: use this one.

    Times: on CUDA, wall time after a synchronisation; on the CPU, the CPU time of this thread with torch
    on one thread (what other processes on the machine do then barely counts).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        model = tiny_model(layers, head_dim, DTYPES[dtype], device.type, hidden, heads)
        cache = cache if cache is not None else MustafarCache(sparsity, sparsity, window, chunk, backend=backend)
        ids = torch.randint(1024, (batch, prompt), generator=torch.Generator().manual_seed(1)).to(device)
        clock = time.perf_counter if device.type == "cuda" else time.thread_time
        result = decode_run(model, cache, ids, steps, checkpoints, slack, clock)
        timing = time_verdict(result, paired(model, cache, ids, result.pop("token"), pairs, clock), layers, margin)
    finally:
        torch.set_num_threads(threads)
    memory_ok = all(mark["ok"] for mark in result["checkpoints"])
    settings = {"steps": steps, "layers": layers, "hidden": hidden, "heads": heads, "head_dim": head_dim,
                "dtype": dtype, "batch": batch, "prompt": prompt, "window": window, "chunk": chunk,
                "sparsity": sparsity, "backend": backend, "slack_bytes": slack,
                "clock": "wall (synchronised)" if device.type == "cuda" else "thread CPU time, 1 torch thread"}
    return {"settings": settings, "device": _device_name(device), "versions": _versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoints": result["checkpoints"], "time": timing,
            "step_times_s": result["times"], "memory_ok": memory_ok, "time_ok": timing["ok"],
            "ok": memory_ok and timing["ok"]}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})"


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "mustafar": mustafar.__version__}


def report(result: dict) -> str:
    """The printed verdict."""
    last, timing = result["checkpoints"][-1], result["time"]
    memory = (f"memory: {'OK' if result['memory_ok'] else 'FAIL'} at {len(result['checkpoints'])} checkpoints; at "
              f"{last['tokens']} tokens nbytes {last['nbytes']} (formula {last['expected_nbytes']}), allocated "
              f"{last['allocated_nbytes']} (formula {last['expected_allocated']}), in use beyond the cache "
              f"{last['in_use_beyond_cache']} B (slack {result['settings']['slack_bytes']}), links {last['links']}")
    steps = (f"time: {'OK' if result['time_ok'] else 'FAIL'}; step at the end {timing['paired_long_step_s'] * 1e3:.3f} "
             f"ms vs at the start {timing['paired_short_step_s'] * 1e3:.3f} ms (alternated): "
             f"x{timing['paired_ratio']:.2f}, attention predicts x{timing['expected_ratio']:.2f}, bound "
             f"x{timing['margin'] * timing['expected_ratio']:.2f}; last/first tenth of the run "
             f"x{timing['last_over_first']:.2f}")
    lines = [f"long run on {result['device']}: {result['settings']}", memory, steps,
             f"VERDICT: {'PASS' if result['ok'] else 'FAIL'}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("steps", 20000), ("layers", 4), ("head-dim", 128), ("batch", 1), ("prompt", 64),
                          ("window", 32), ("chunk", 256), ("pairs", 200), ("checkpoints", 10)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--margin", type=float, default=1.5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=Path("long-run-out"))
    args = parser.parse_args()
    dtype = args.dtype or ("fp16" if torch.cuda.is_available() else "fp32")
    result = run(args.steps, args.layers, args.head_dim, dtype, args.batch, args.prompt, args.window, args.chunk,
                 args.sparsity, args.backend, args.margin, args.pairs, args.checkpoints)
    print(report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_run.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'long_run.json'}")
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
