"""mustafar.evaluation.study: paired comparisons and the Markdown it renders, on hand-made results."""

import pytest

from mustafar.evaluation.results import SampleResult
from mustafar.evaluation.study import comparison_table, comparisons


def _result(method, setting, task, index, score, length=4096):
    return SampleResult(setting, task, length, index, length, 1, 1, 0.0, score=score, method=method, suite="ruler")


def test_paired_differences_and_discordant_counts():
    results = []
    for index in range(10):
        results.append(_result("dense", "dense", "vt", index, 1.0))
        results.append(_result("dense", "dense", "cwe", index, 0.5))
        results.append(_result("per-token", "K0.5V0.5", "vt", index, 1.0 if index < 6 else 0.0))
        results.append(_result("per-token", "K0.5V0.5", "cwe", index, 0.5))
        results.append(_result("think", "K0.5V0.5", "vt", index, 1.0 if index < 6 else 0.0))
        results.append(_result("think", "K0.5V0.5", "cwe", index, 0.5))
    results.append(_result("per-token", "K0.5V0.5", "vt", 99, 1.0))  # no dense partner: left out of the pairs
    found = {(c["comparison"], c["method"]): c for c in comparisons(results)}
    versus = found["vs dense", "per-token"]
    assert versus["delta"] == pytest.approx(-0.4 / 2) and versus["discordant"] == 4 and versus["samples"] == 20
    assert versus["ci95"][0] < versus["delta"] < versus["ci95"][1] < 0 and versus["excludes_zero"]
    same = found["per-token vs think", "per-token"]
    assert same["delta"] == 0 and same["discordant"] == 0 and same["ci95"] == [0.0, 0.0] and not same["excludes_zero"]
    assert ("per-token vs per-channel", "per-token") not in found, "no per-channel results: not compared"
    table = comparison_table([versus])
    assert "| vs dense | per-token | K0.5V0.5 | dense dense | 4096 | -20.0 [" in table and "| 4 / 20 |" in table


def test_fp8_settings_compare_with_their_fp16_twin():
    results = [_result("per-token", s, "vt", i, float(i % 2)) for s in ("K0.5V0.5", "K0.5V0.5-fp8") for i in range(4)]
    results += [_result("dense", "dense", "vt", i, 1.0) for i in range(4)]
    results += [_result("per-token", "K0V0-fp8", "vt", i, 1.0) for i in range(4)]
    pairs = {(c["setting"], c["against"]) for c in comparisons(results) if c["comparison"] == "fp8 vs fp16 kept values"}
    assert pairs == {("K0.5V0.5-fp8", "per-token K0.5V0.5"), ("K0V0-fp8", "dense dense")}
