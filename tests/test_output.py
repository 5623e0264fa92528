"""Who shows what: the library logs and reports progress (imgclf.progress); the command line
draws both for the duration of a command (imgclf.cli.console) and leaves nothing behind."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from imgclf import progress
from imgclf.cli.console import ConsoleHandler, command_output, rich_reporter


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=100, force_terminal=False), out


def test_a_task_reports_nothing_by_default(caplog):
    caplog.set_level(logging.DEBUG, logger="imgclf")
    with progress.task("Caching features", total=3) as advance:
        advance()
        advance(2)
    assert "Caching features (3 items)" in caplog.text


def test_reporting_installs_a_reporter_for_the_block_only():
    seen = []

    def reporter(description, total):
        seen.append((description, total))
        return progress.silent(description, total)

    with pytest.raises(RuntimeError):
        with progress.reporting(reporter):
            with progress.task("a", 2):
                pass
            with progress.task("small", 2, show=False):  # never shown, whoever reports
                pass
            raise RuntimeError
    with progress.task("b", 1):
        pass
    assert seen == [("a", 2)]


def test_rich_bars_nest_and_leave_no_live_display():
    out, _ = _console()
    task = rich_reporter(out)
    with task("outer", 2) as advance:
        with task("inner", 3) as inner:  # rich allows one live display: they share it
            inner(3)
        advance(2)
    with task("again", 1) as advance:  # a new display: the first one was stopped
        advance()


def test_command_output_prints_imgclf_records_and_restores_the_logger():
    out, text = _console()
    logger = logging.getLogger("imgclf")
    handlers, level = list(logger.handlers), logger.level
    with pytest.raises(KeyError):
        with command_output(out):
            logging.getLogger("imgclf.commands.train").info("Run directory: %s", "[bold]x")
            logging.getLogger("imgclf.data.files").debug("not shown at INFO")
            logging.getLogger("imgclf").warning("skipped a.jpg: truncated")
            assert progress._reporter is not progress.silent
            raise KeyError
    assert logger.handlers == handlers and logger.level == level
    assert progress._reporter is progress.silent
    printed = text.getvalue()
    assert "Run directory: [bold]x" in printed  # no markup read in messages
    assert "skipped a.jpg: truncated" in printed and "not shown" not in printed


def test_a_record_with_a_view_is_drawn_as_its_table():
    out, text = _console()
    handler = ConsoleHandler(out)
    rows = [{"rank": 1, "path": "a/[red]b.jpg", "given": "cat", "suggested": "dog", "score": 0.5}]
    record = logging.LogRecord("imgclf", logging.INFO, __file__, 1, "Top %d", (1,), None)
    record.view, record.data = "label_issues", rows
    handler.emit(record)
    printed = text.getvalue()
    assert "Top 1" in printed and "a/[red]b.jpg" in printed and "0.500" in printed
