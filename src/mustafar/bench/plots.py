"""PNG plots of the benchmark rows (matplotlib optional: without it, nothing is drawn).

- ``tokens_per_s.png``: decode tokens/s vs batch, one panel per prompt length,
  one line per (mode, setting).
- ``memory.png``: KV bytes (top) and peak device memory (bottom, when measured)
  vs prompt length, one panel per batch, one line per (mode, setting).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_results"]

_GIB = 2**30


def _series(rows: list[dict], panel: str, x: str, y: str) -> dict:
    """``{panel value: {(mode, setting): [(x, y), ...]}}`` over the rows that ran."""
    out: dict = {}
    for row in rows:
        if row["status"] != "ok" or row.get(y) is None:
            continue
        line = out.setdefault(row[panel], {}).setdefault((row["mode"], row["setting"]), [])
        line.append((row[x], row[y]))
    return out


def _draw(axes, series: dict, scale: float = 1.0) -> None:
    for (mode, setting), points in sorted(series.items()):
        points.sort()
        style = "-" if mode == "graph" else "--"
        axes.plot([p[0] for p in points], [p[1] / scale for p in points], style, marker="o",
                  label=f"{setting} ({mode})")
    axes.set_xscale("log", base=2)
    axes.grid(True, alpha=0.3)


def plot_results(out: Path, rows: list[dict], title: str = "") -> list[Path] | None:
    """Draw both plots into ``out``; return their paths, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return [_throughput(plt, out / "tokens_per_s.png", rows, title), _memory(plt, out / "memory.png", rows, title)]


def _throughput(plt, path: Path, rows: list[dict], title: str) -> Path:
    by_prompt = _series(rows, "prompt", "batch", "tokens_per_s")
    panels = sorted(by_prompt) or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, prompt in zip(axes[0], panels):
        if prompt is not None:
            _draw(ax, by_prompt[prompt])
            ax.legend(fontsize="small")
        ax.set_title(f"prompt {prompt} tokens")
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _memory(plt, path: Path, rows: list[dict], title: str) -> Path:
    kv, peak = _series(rows, "batch", "prompt", "kv_bytes"), _series(rows, "batch", "prompt", "peak_bytes")
    panels = sorted(kv) or [None]
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for column, batch in enumerate(panels):
        for ax, series, label in ((axes[0][column], kv, "KV cache (GiB)"), (axes[1][column], peak, "peak (GiB)")):
            if batch is not None and batch in series:
                _draw(ax, series[batch], _GIB)
                ax.legend(fontsize="small")
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
