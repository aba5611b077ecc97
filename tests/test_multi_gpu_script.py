"""``benchmarks/multi_gpu.py`` (issue 6): argument parsing, ``--dry-run`` and its CPU smoke paths.

The 2-GPU runs themselves need GPUs; here the same code runs on a CPU with the ``tiny`` shape:
``device-map`` in this process, ``tp`` under ``torchrun`` with two gloo ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mustafar

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "multi_gpu.py"
SMOKE = ["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--batch", "2", "--prompt-len", "40",
         "--new-tokens", "6", "--static-steps", "5", "--window", "8", "--chunk", "16", "--init-std", "0.1",
         "--setting", "K0.5V0.5"]


@pytest.fixture(scope="module")
def script():
    """The script as a module; the environment variables it sets on import are restored afterwards."""
    saved = dict(os.environ)
    spec = importlib.util.spec_from_file_location("multi_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    os.environ.clear()
    os.environ.update(saved)


def test_parse_args(script):
    args = script.parse_args(["tp"])
    assert (args.shape, args.dtype, args.device, args.sparse.name) == ("llama3-8b", "float16", "cuda", "K0.7V0.7")
    assert [os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")] \
        == ["0", "1", "1"]
    for bad in (["pp"], ["tp", "--batch", "0"], ["tp", "--new-tokens", "1"], ["tp", "--device", "tpu"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)
    with pytest.raises(ValueError):
        script.parse_args(["tp", "--setting", "K2V0"])


def test_dry_run_builds_nothing(script, capsys):
    plan = script.main(["tp", "--dry-run"])
    assert plan["dry_run"] and plan["model"]["kv_heads"] == 8 and plan["kv_heads_per_rank"] == 4
    assert json.loads(capsys.readouterr().out) == plan


def _check_summary(summary: dict) -> None:
    assert summary["agreement"]["dense"]["equal"] and summary["agreement"]["sparse"]["equal"]
    assert not summary["agreement"]["sparse_vs_dense"]["equal"]  # the sparse run really prunes
    assert summary["kv_ratio"] < 1
    for run in summary["multi"].values():
        assert run["decode_tokens_per_s"] > 0 and run["timed_run_same_tokens"] and len(run["tokens"][0]) == 6


def test_device_map_cpu_smoke(script, tmp_path):
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers needs accelerate to load a model with a device_map")
    summary = script.main(["device-map", *SMOKE, "--out", str(tmp_path / "dm.json")])
    assert json.loads((tmp_path / "dm.json").read_text()) == json.loads(json.dumps(summary))
    _check_summary(summary)
    assert summary["placement"]["all_on_layer_device"] and summary["placement"]["kv_heads"] == [2]
    static = summary["static"]
    assert static["tokens_equal_chunk1_cache"] and static["placement"]["all_on_layer_device"]


def test_tp_cpu_smoke(tmp_path):
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers needs accelerate to load a model with tp_plan")
    src = str(Path(mustafar.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT),
               "tp", *SMOKE, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads(out.read_text())
    _check_summary(summary)
    assert summary["environment"]["world_size"] == 2 and summary["environment"]["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert summary["kv_heads_per_rank_expected"] == 1 and summary["kv_heads_per_rank_ok"]
    assert summary["reference_equal_on_all_ranks"]
    for rank in summary["ranks"]:
        assert rank["static"]["tokens_equal_chunk1_cache"] and rank["static"]["placement"]["kv_heads"] == [1]
        assert rank["kv_bytes"]["sparse"] < rank["kv_bytes"]["dense"]
