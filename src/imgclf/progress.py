"""Progress of long loops, reported without drawing anything: the command line draws it.

    with progress.task("Caching features", total=len(dataset)) as advance:
        for batch in loader:
            ...
            advance(len(batch))

By default a task only logs a DEBUG line. `imgclf.cli` installs a reporter that draws rich bars,
for the duration of a command (`reporting`), and puts the previous one back afterwards.

A reporter is a function (description, total) -> context manager yielding `advance(n=1)`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Optional

log = logging.getLogger(__name__)

Advance = Callable[..., None]
Reporter = Callable[[str, Optional[int]], AbstractContextManager]


def _advance_nothing(n: int = 1) -> None:
    pass


@contextlib.contextmanager
def silent(description: str, total: int | None = None) -> Iterator[Advance]:
    """The default reporter: a DEBUG log line, nothing drawn."""
    log.debug("%s (%s items)", description, "?" if total is None else total)
    yield _advance_nothing


_reporter: Reporter = silent


def task(description: str, total: int | None = None, show: bool = True) -> AbstractContextManager:
    """A unit of work of `total` steps, reported by the installed reporter.

    Args:
        description: What is being done, as the user reads it.
        total: Steps in all (None: unknown).
        show: False reports nothing visible whatever the reporter (small jobs, where a bar
            would flash by).

    Returns:
        A context manager yielding `advance(n=1)`, to call as steps finish.
    """
    return (_reporter if show else silent)(description, total)


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Within the block, tasks are reported by `reporter` (None: by `silent`); the previous
    reporter is back on exit."""
    global _reporter
    before, _reporter = _reporter, reporter or silent
    try:
        yield
    finally:
        _reporter = before
