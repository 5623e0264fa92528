"""The command line (`imgclf ...`): the typer app and its console, the only place that prints.

    python -m imgclf.cli train photos/      # same as `imgclf train photos/`
"""

from imgclf.cli.app import app, console, main

__all__ = ["app", "console", "main"]
