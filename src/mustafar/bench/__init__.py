"""Benchmarks: decode speed and memory of dense vs Mustafar caches on random-weight models.

Entry points: :func:`run_bench` (the ``mustafar bench`` command: the grid, or
the capacity search with ``capacity=True``), :func:`graph_decode` (a
graph-captured greedy decode loop over a static cache), :func:`build_model`
(named shapes with random weights, :data:`SHAPES`).

This package imports neither typer nor rich, and plots only when matplotlib
is installed.
"""

from .capacity import Probe, find_max_batch
from .config import QUICK, BenchConfig
from .decode import DecodeTimings, generate_decode, graph_decode
from .models import SHAPES, build_config, build_model
from .runner import run_bench

__all__ = ["run_bench", "BenchConfig", "QUICK", "graph_decode", "generate_decode", "DecodeTimings",
           "build_model", "build_config", "SHAPES", "find_max_batch", "Probe"]
