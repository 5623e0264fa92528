"""The command line (`imgclf ...`): the typer app and its console, the only place that prints
(app.py parses and calls the library; console.py draws its log records and progress; render.py
its tables).

    python -m imgclf.cli train photos/      # same as `imgclf train photos/`
"""

from imgclf.cli.app import app, console, main

__all__ = ["app", "console", "main"]
