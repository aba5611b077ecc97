"""``mustafar generate --kept-dtype`` with a bad value (QA): the error names the CLI's own choices."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mustafar.cli import app

runner = CliRunner()


@pytest.mark.parametrize("value", ["bogus", "float16", "None"])
def test_generate_refuses_a_bad_kept_dtype_with_the_cli_choices(value):
    result = runner.invoke(app, ["generate", "--kept-dtype", value, "hi"])
    assert result.exit_code != 0
    assert "'cache' or 'fp8'" in result.output and value in result.output
