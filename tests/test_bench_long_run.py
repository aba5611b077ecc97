"""Long decode runs on the CPU: memory equals the format's formula, step time grows only as the attention (issue 5).

A CPU-sized run of ``benchmarks/long_run.py`` (the GPU run, 20k steps, is that
script on a CUDA machine; see its docstring). Both of its verdicts are shown to
fail on purpose: a cache that leaks a copy of its window per step, and one whose
update slows down with the context.
"""

import importlib.util
from pathlib import Path

import pytest

from mustafar import MustafarCache

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_run.py"
SMALL = {"layers": 2, "head_dim": 16, "hidden": 64, "heads": 4, "dtype": "fp32", "prompt": 32, "window": 16,
         "chunk": 32, "device": "cpu", "slack": 256 << 10}


def long_run():
    spec = importlib.util.spec_from_file_location("long_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LeakyCache(MustafarCache):
    """Keeps a copy of the window it returns at every step (the leak the memory verdict must catch)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.__dict__.setdefault("kept", []).append(keys.clone())
        return keys, values


class SlowingCache(MustafarCache):
    """Works in proportion to the context on every update (the creep the time verdict must catch)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        sum(range(400 * self.get_seq_length(layer_idx)))  # an O(context) Python loop per step
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@pytest.mark.slow
def test_long_run_memory_is_the_formula_and_steps_do_not_creep():
    module = long_run()
    result = module.run(steps=1500, pairs=50, checkpoints=5, **SMALL)
    print(module.report(result))
    marks = result["checkpoints"]
    assert [mark["tokens"] for mark in marks] == [332, 632, 932, 1232, 1532]
    assert all(mark["nbytes"] == mark["expected_nbytes"] for mark in marks)
    assert all(mark["allocated_nbytes"] == mark["expected_allocated"] for mark in marks)
    assert all(mark["in_use_beyond_cache"] <= SMALL["slack"] and mark["links"] <= 2 * SMALL["layers"] for mark in marks)
    assert result["time"]["paired_ratio"] <= result["time"]["margin"] * result["time"]["expected_ratio"]
    assert result["ok"]


def test_long_run_catches_a_leak():
    module = long_run()
    result = module.run(steps=200, pairs=10, checkpoints=2, cache=LeakyCache(0.5, 0.5, 16, 32), **SMALL)
    assert not result["memory_ok"] and not result["ok"]
    assert result["checkpoints"][-1]["in_use_beyond_cache"] > SMALL["slack"]


def test_long_run_catches_a_slowdown():
    module = long_run()
    result = module.run(steps=200, pairs=10, checkpoints=1, cache=SlowingCache(0.5, 0.5, 16, 32), **SMALL)
    assert result["memory_ok"] and not result["time_ok"] and not result["ok"]
