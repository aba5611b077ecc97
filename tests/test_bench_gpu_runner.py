"""``benchmarks/run_gpu.py``, the one GPU runner (issue 12): arguments, commands, and a CPU step end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "run_gpu.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("run_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_gpu"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("run_gpu", None)


def test_every_step_builds_a_command(runner, tmp_path):
    args = runner.parse_args(["build", "tests", "attention", "e2e", "tokens", "long-run", "capacity", "memcheck",
                              "racecheck", "tp", "device-map", "env", "tests", "--out", str(tmp_path),
                              "--tests-k", "cuda or static", "--attention-args", "--backends cuda --shapes llama3-8b"])
    assert args.steps[:2] == ["build", "tests"] and args.steps.count("tests") == 1 and len(args.steps) == 12
    commands = {name: runner.STEPS[name].command(args) for name in args.steps}
    assert commands["tests"][-2:] == ["-k", "cuda or static"]
    assert commands["attention"][-4:] == ["--backends", "cuda", "--shapes", "llama3-8b"]
    assert commands["e2e"][-1] == "--quick" and commands["long-run"][3] == "20000"
    assert commands["memcheck"][:3] == ["compute-sanitizer", "--tool", "memcheck"]
    assert "torch.distributed.run" in commands["tp"] and dict(runner.STEPS["tp"].env)["NCCL_NVLS_ENABLE"] == "0"
    for command in commands.values():
        for part in command:
            if part.startswith("benchmarks/"):
                assert (SCRIPT.parents[1] / part).is_file(), part


def test_unknown_step_is_refused(runner):
    with pytest.raises(SystemExit):
        runner.parse_args(["compile"])


def test_dry_run_and_a_real_step_on_the_cpu(runner, tmp_path, capsys):
    assert runner.main(["build", "tests", "--dry-run", "--out", str(tmp_path)]) == 0
    assert "== build:" in capsys.readouterr().out
    runner.STEPS["echo"] = runner.Step(lambda a: [sys.executable, "-c", "print('hello from a step')"], 30)
    try:
        assert runner.run_step("echo", runner.parse_args(["env", "--out", str(tmp_path)])) == 0
        assert (tmp_path / "echo.log").read_text() == "hello from a step\n"
        runner.STEPS["fail"] = runner.Step(lambda a: [sys.executable, "-c", "raise SystemExit(3)"], 30)
        assert runner.run_step("fail", runner.parse_args(["env", "--out", str(tmp_path)])) == 3
    finally:
        runner.STEPS.pop("echo"), runner.STEPS.pop("fail", None)


def test_kernel_steps_build_their_commands(runner, tmp_path):
    args = runner.parse_args(["gpu-tests", "variants", "ncu", "--out", str(tmp_path)])
    assert runner.STEPS["gpu-tests"].command(args)[-3:] == ["-m", "gpu", "tests/"]
    variants = runner.STEPS["variants"].command(args)
    assert variants[1] == "benchmarks/kernel_variants.py" and f"v2=@{runner.V2_COMMIT}" in variants
    script = runner.STEPS["ncu"].command(args)[-1]
    assert script.count("benchmarks/ncu_case.py") == 4 and "--clock-control none" in script
    assert (SCRIPT.parent / "ncu_case.py").is_file() and (SCRIPT.parent / "kernel_variants.py").is_file()
