"""The flags of `imgclf train` and `imgclf cv`, generated from TrainConfig's fields.

Each field becomes `--field-name` with the field's default and help (imgclf.config declares
them); `data` becomes the DATA argument. Typer reads a command's parameters from its signature,
so `config_options` gives the command function a signature built from the fields, and
`config_from_flags` turns what typer passes back into a TrainConfig.

Options whose type typer cannot parse (a number or 'auto', a count or a device list, a comma
list) are taken as text and converted here, with the same rules as before the CLI was generated.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

from imgclf.config import TrainConfig, flag_name, parse_ints, parse_words
from imgclf.errors import ImgclfError

_HINTS = typing.get_type_hints(TrainConfig)
# Field types typer parses itself; any other (float | str, int | str, list[int] | None) is text.
_NATIVE = {bool, int, float, str}


def _cli_type(f: dataclasses.Field):
    """The annotation typer sees for a field."""
    hint = _HINTS[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = hint if not args else args[0] if len(args) == 1 else None
    if hint == (list[str] | None):  # a repeatable option (--logger csv --logger mlflow)
        return Optional[list[str]]
    if base not in _NATIVE:
        base = str
    if f.metadata.get("path"):
        base = Path
    return Optional[base] if optional or f.default in ("", None) else base


def _cli_default(f: dataclasses.Field):
    if f.default in ("", None):  # "" (no data) and None both read as "not given"
        return None
    return Path(f.default) if f.metadata.get("path") else f.default


def _parameter(f: dataclasses.Field, help: str | None = None) -> inspect.Parameter:
    text = help or f.metadata["help"]
    if f.name == "data":
        spec = typer.Argument(_cli_default(f), help=text, show_default=False)
    else:
        decls = [f.metadata["flag"]] if f.metadata.get("flag") else []
        spec = typer.Option(_cli_default(f), *decls, help=text)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=spec,
                             annotation=_cli_type(f))


def field_option(name: str):
    """The typer option of one TrainConfig field, for a command that takes only a few of them
    (declared once: the field's default and help)."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return typer.Option(_cli_default(f), *([f.metadata["flag"]] if f.metadata.get("flag") else []),
                        help=f.metadata["help"])


def config_options(*, own: dict | None = None, skip=(), help: dict | None = None):
    """Give a command the TrainConfig fields as flags, next to its own parameters.

    Args:
        own: The command's own parameters, listed after DATA and before the fields:
            {name: (annotation, typer.Option(...))}.
        skip: Fields the command does not take.
        help: Help text replacing a field's, where the command gives it another meaning.

    Returns:
        A decorator for a function taking the fields, `config` (--config FILE) and `ctx` (the
        click context) as `**flags`; it replaces the function's signature, from which typer
        builds the command's options.
    """
    help = help or {}
    fields = [_parameter(f, help.get(f.name))
              for f in dataclasses.fields(TrainConfig) if f.name not in skip]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=spec,
                               annotation=annotation)
             for name, (annotation, spec) in (own or {}).items()]

    extra.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help="Settings file (YAML, TrainConfig's field "
                             "names; a run's config.yaml reproduces it); flags given override it.")))
    # The click context, which says which flags were given (typer passes it by annotation).
    extra.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    def wrap(fn):
        fn.__signature__ = inspect.Signature([*fields[:1], *extra, *fields[1:]])  # DATA first
        return fn

    return wrap


def given_on_command_line(ctx: typer.Context | None, name: str) -> bool:
    """Whether the command's parameter `name` was typed (or set from the environment), rather
    than left at its default (click's parameter source)."""
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def config_from_flags(flags: dict) -> TrainConfig:
    """The TrainConfig of the flags typer parsed (fields only; other keys are ignored).

    With `--config FILE` the file's settings are the base and only the flags given on the
    command line replace them (a flag left at its default does not undo the file).

    Raises:
        ImgclfError: A text option that does not parse (`--lr fast`, `--sizes 128,big`), or
            a settings file that cannot be read or names an unknown setting.
    """
    config_file, ctx = flags.get("config"), flags.get("ctx")
    values = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in flags:
            continue
        value, hint = flags[f.name], _HINTS[f.name]
        if value is None:
            value = f.default
        elif f.metadata.get("path"):
            value = str(value)
        elif hint == (float | str):  # a number or a word such as 'auto'
            value = value if value == f.default else _number(value, flag_name(f.name))
        elif hint == (int | str):  # a count, or text such as 'auto' or '0,1'
            value = int(value) if value.isdigit() else value
        elif hint == (list[int] | None):  # a comma list
            value = parse_ints(value, flag_name(f.name))
        elif hint == (list[str] | None):  # repeated and/or comma-separated words
            value = parse_words(value)
        values[f.name] = value
    if config_file is None:
        return TrainConfig(**values)
    if not Path(config_file).is_file():
        raise ImgclfError(f"--config {config_file}: no such file")
    base = TrainConfig.from_yaml(Path(config_file))
    return dataclasses.replace(base, **{k: v for k, v in values.items()
                                        if given_on_command_line(ctx, k)})


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ImgclfError(f"{flag} takes a number or 'auto', not {text!r}") from None
