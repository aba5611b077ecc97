"""Command-line rough edges: readable help at 80 columns, values echoed in errors, quiet loading, fast offline."""

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import mustafar.models
from mustafar.cli import _quiet, app

runner = CliRunner()


def test_eval_help_is_readable_at_80_columns():
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "mustafar", "eval", "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in done.stdout
    text = " ".join(done.stdout.split())
    for default in ("dense,K0.5V0.5,K0.7V0.7", "passkey,niah,niah-multikey,ppl", "1024,2048,4096", "--batch-size",
                    "--verbose"):
        assert default in text


@pytest.mark.parametrize("args, shown", [
    (["eval", "--max-new-tokens", "-5"], "got -5"),
    (["eval", "--samples", "0"], "got 0"),
    (["eval", "--batch-size", "0"], "got 0"),
    (["eval", "--window", "-3"], "got -3"),
    (["generate", "hi", "--max-new-tokens", "-5"], "got -5"),
])
def test_errors_echo_the_value_received(args, shown):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert shown in result.output and "must be >=" in result.output


def test_quiet_loading_unless_verbose():
    from transformers.utils import logging as hf_logging

    try:
        hf_logging.enable_progress_bar()  # an earlier command in this process may have turned it off
        _quiet(True)
        assert hf_logging.is_progress_bar_enabled()
        _quiet(False)
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()


def test_offline_hub_id_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"):
        mustafar.models.load_model("fake-org/no-such-model-xyz")
    assert time.perf_counter() - start < 5
    result = runner.invoke(app, ["eval", "--model", "fake-org/no-such-model-xyz", "--no-progress"])
    assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.output


def test_first_connection_error_fails_at_once(monkeypatch):
    import huggingface_hub.utils

    calls = []

    class Unreachable:
        def head(self, url, **kwargs):
            calls.append(url)
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Unreachable())
    with pytest.raises(OSError, match="no connection to the Hugging Face Hub .*ConnectionError.*embedded default"):
        mustafar.models.load_tokenizer("fake-org/no-such-model-xyz")
    assert len(calls) == 1, "one request, no retries"
