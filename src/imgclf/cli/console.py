"""The console of a command: imgclf's log records and progress drawn with rich, on stderr.

The library prints nothing: it logs to the "imgclf" logger and reports long loops through
`imgclf.progress`. For the duration of a command, `command_output` puts a handler on that logger
which prints each record on the console (warnings in yellow), or draws it as a table when the
record carries a view (see `imgclf.cli.render`), and installs a reporter that draws progress
bars. Both are removed, and the logger's level restored, when the command ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from imgclf import progress

console = Console(stderr=True, soft_wrap=True)  # messages stay one line each, even in logs


class ConsoleHandler(logging.Handler):
    """Log records on a rich console: the message as plain text (no markup is interpreted, so
    file and class names print as they are), or the record's view drawn by its renderer."""

    def __init__(self, out: Console):
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        from imgclf.cli.render import RENDERERS  # lazy: start-up time of every command

        try:
            render = RENDERERS.get(getattr(record, "view", None))
            if render is not None:
                render(self.out, record.data, record.getMessage())
                return
            style = "yellow" if record.levelno >= logging.WARNING else None
            self.out.print(record.getMessage(), style=style, markup=False, highlight=False)
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises
            self.handleError(record)


def rich_reporter(out: Console) -> progress.Reporter:
    """A progress reporter drawing transient rich bars on `out`; tasks started while another
    runs share its display (rich allows one live display at a time)."""
    live: dict = {"bar": None, "tasks": 0}

    @contextlib.contextmanager
    def task(description: str, total: int | None):
        if live["bar"] is None:
            live["bar"] = Progress(TextColumn("{task.description}"), BarColumn(),
                                   MofNCompleteColumn(), TimeRemainingColumn(), console=out,
                                   transient=True)
            live["bar"].start()
        bar = live["bar"]
        live["tasks"] += 1
        tid = bar.add_task(description, total=total)
        try:
            yield lambda n=1: bar.advance(tid, n)
        finally:
            bar.remove_task(tid)
            live["tasks"] -= 1
            if not live["tasks"]:
                bar.stop()
                live["bar"] = None

    return task


@contextlib.contextmanager
def command_output(out: Console = console) -> Iterator[None]:
    """Within the block, the "imgclf" logger prints INFO and above on `out` and progress is
    drawn there; handlers, level and progress reporter are restored on exit."""
    logger = logging.getLogger("imgclf")
    level = logger.level
    handler = ConsoleHandler(out)
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        with progress.reporting(rich_reporter(out)):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
