"""The GPU-vs-CPU token check script (benchmarks/gpu_cpu_tokens.py) runs its CPU side and finds divergences."""

import importlib.util
import pathlib

import torch

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_cpu_tokens.py"
_spec = importlib.util.spec_from_file_location("gpu_cpu_tokens", _PATH)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def test_cpu_side_is_deterministic():
    model, _ = script.build(seed=0, layers=1)
    prompt = torch.randint(49152, (1, 40), generator=torch.Generator().manual_seed(1))
    first, _ = script.greedy(model, prompt, 4, "cpu", torch.float32)
    second, _ = script.greedy(model, prompt, 4, "cpu", torch.float32)
    assert first.shape == (4,) and torch.equal(first, second)


def test_divergence_reports_step_and_gaps():
    scores = [torch.tensor([[1.0, 3.0, 2.5]]), torch.tensor([[0.0, 5.0, 1.0]])]
    assert script.divergence(torch.tensor([1, 1]), torch.tensor([1, 1]), scores, scores) == {}
    found = script.divergence(torch.tensor([1, 2]), torch.tensor([1, 1]), scores, scores)
    assert found["step"] == 1 and found["cpu_token"] == 2 and abs(found["cpu_top2_gap"] - 4.0) < 1e-6
