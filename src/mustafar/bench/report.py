"""The benchmark's outputs: the environment record, one summary line per case, the JSON file and the plots.

Files written into the output directory: ``bench.json`` (grid) or
``capacity.json`` (capacity search), both ``{"environment", "config", "rows" |
"capacity"}``; for the grid also ``tokens_per_s.png`` and ``memory.png`` when
matplotlib is installed (otherwise the plots are skipped with a message).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from .memory import gib
from .timing import Clock

__all__ = ["environment", "summary_line", "write_results", "ALLOC_CONF"]

#: The environment variable of PyTorch's CUDA allocator settings.
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(clock: Clock, model, command: str | None = None) -> dict:
    """Device, versions, date (UTC, ISO 8601), command line and model of a run."""
    import transformers

    import mustafar

    config = model.config
    return {
        "device": clock.name(),
        "device_memory_bytes": clock.total_bytes(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "mustafar": mustafar.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join(["mustafar"] + sys.argv[1:]),
        "cuda_alloc_conf": os.environ.get(ALLOC_CONF),
        "model": {"architecture": type(model).__name__, "layers": config.num_hidden_layers,
                  "hidden": config.hidden_size, "dtype": str(model.dtype).replace("torch.", ""),
                  "weights": "random (no checkpoint)",
                  "quantised": getattr(config, "mustafar_weights", None)},
    }


def summary_line(row: dict) -> str:
    """One line for a case: ``graph K0.7V0.7 b16 p32768: ttft 1234 ms, 456 tokens/s, ...``."""
    head = f"{row['mode']:<8} {row['setting']:<9} b{row['batch']:<3} p{row['prompt']:<6}"
    if row["status"] != "ok":
        return f"{head} skipped: {row['reason']}"
    ttft = "random fill" if row.get("ttft_ms") is None else f"ttft {row['ttft_ms']:.0f} ms"
    parts = [ttft, f"step {row['step_ms']:.2f} ms",
             f"{row['tokens_per_s']:.0f} tokens/s", f"peak {gib(row['peak_bytes'])}",
             f"KV {gib(row['kv_bytes'])} ({100 * (row['kv_ratio'] or 0):.1f} % of dense)"]
    breakdown = row.get("breakdown")
    if breakdown:
        rest = breakdown["rest_ms"]
        keeping = breakdown.get("bookkeeping_ms", breakdown["compression_ms"])
        rest_text = f"{rest:.2f} ms" if rest >= 0 else (
            f"n/a (attention and bookkeeping timed alone exceed the step by {-rest:.2f} ms)")
        parts.append(f"attention {breakdown['attention_ms']:.2f} / bookkeeping {keeping:.2f}"
                     f" / rest {rest_text}")
    return f"{head} " + ", ".join(parts)


def write_results(out: Path, result: dict, log: Callable[[str], None] = print) -> list[Path]:
    """Write the JSON file and (grid only) the plots into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    name = "capacity.json" if "capacity" in result else "bench.json"
    path = out / name
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    written = [path]
    if "rows" in result:
        from .plots import plot_results

        plots = plot_results(out, result["rows"], title=_title(result))
        if plots is None:
            log("matplotlib is not installed: skipped the PNG plots")
        else:
            written += plots
    return written


def _title(result: dict) -> str:
    env, config = result["environment"], result["config"]
    layers = f", {config['layers']} layers" if config.get("layers") else ""
    return f"mustafar bench: {config.get('shape')}{layers}, {env.get('device')}, {env.get('date', '')[:10]}"
