"""`imgclf predict` refuses option values that make no sense, in one line, before loading anything."""

from __future__ import annotations

from typer.testing import CliRunner

from imgclf.cli.app import app


def test_negative_top_k_is_refused_with_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path), "--top-k", "-1"],
                                env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert result.exit_code == 2
    assert "top-k" in text and "greater than or equal to 1" in text
    assert "Traceback" not in result.output
