"""``charlm train``'s options as Typer parameters, built from their one declaration
(training/options.py): the flag, type, default, help and help panel of each."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from charlm.training.options import DECLARED, Declared

_TYPES: dict[str, Any] = {"text": str, "int": int, "float": float, "bool": bool}


def _parameter(option: Declared) -> inspect.Parameter:
    if option.spec.argument:
        info = typer.Argument(help=option.spec.help, show_default=False)
        return inspect.Parameter(option.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                 annotation=Annotated[Optional[str], info])
    if option.kind == "patterns":  # repeatable: --include '*.c' --include '*.h'
        kind: Any = Optional[list[str]]
        declarations = [option.flag]
    else:
        kind = Path if option.spec.path else _TYPES[option.kind]
        kind = Optional[kind] if option.nullable else kind
        declarations = []
        if option.kind == "bool":
            declarations = [option.flag] if option.default is False else [f"{option.flag}/--no-{option.flag[2:]}"]
    info = typer.Option(*declarations, help=option.spec.help, rich_help_panel=option.spec.group)
    default = None if option.kind == "patterns" else option.default
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def with_declared_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command(ctx, *, <its own options>, **options)`` every declared training option as a
    parameter, after ``ctx`` and before its own options, so Typer builds them all."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    declared = [_parameter(option) for option in DECLARED]
    arguments = [p for p in declared if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    options = [p for p in declared if p.kind is inspect.Parameter.KEYWORD_ONLY]
    command.__signature__ = signature.replace(parameters=[own[0], *arguments, *options, *own[1:]])
    return command
