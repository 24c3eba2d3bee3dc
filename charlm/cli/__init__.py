"""The ``charlm`` command line: parse options → call the library → render.

The only package that prints, exits, or knows about terminals: the Typer app and ``main`` live
here, each command in the module of its group, and what they write in ``cli.output``.
"""
from __future__ import annotations

import sys
from typing import Annotated

import typer

from charlm import __version__
from charlm.cli import bench, corpus, infer, inspect, serve, train
from charlm.cli.output import GuardedStdout, OutputLost, console, err, flush_stdout

try:  # Typer ≥ 0.26 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

app = typer.Typer(
    name="charlm",
    help="Train recurrent language models (LSTM, GRU, RNN) on a text file, sample from them, and score text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """charlm: train, sample and score recurrent language models on any text file.

    Example: charlm train corpus.txt && charlm sample --temperature 0.8
    """


# The commands, in the order `charlm --help` lists them.
app.command()(train.train)
app.command()(infer.sample)
app.command()(infer.perplexity)
app.command()(inspect.info)
app.command()(bench.bench)
app.add_typer(corpus.corpus_app, name="corpus")
app.command()(infer.score)
app.command()(inspect.plot)
app.command()(inspect.export)
app.command()(serve.serve)


def main() -> None:
    """The ``charlm`` command: Typer parses; a parse error is one line, like every other error."""
    if sys.stdout is None:  # started with stdout closed (>&-): every command's result would be lost
        err.print("charlm: error: standard output is closed; redirect it to a file or /dev/null instead",
                  markup=False)
        sys.exit(1)
    sys.stdout = GuardedStdout(sys.stdout)  # type: ignore[assignment]
    try:
        code = app(standalone_mode=False)
        flush_stdout()
    except click_errors.NoArgsIsHelpError as exc:  # a group with no command: its help, exit 2 as before
        app(args=[*sys.argv[1:], "--help"], standalone_mode=False)
        code = exc.exit_code
    except click_errors.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"charlm: error: {exc.format_message()}{hint}", markup=False)
        code = exc.exit_code
    except typer.Abort:  # click's Abort (Typer re-exports it whichever click it carries)
        err.print("charlm: interrupted", markup=False)
        code = 130
    except OutputLost as exc:
        err.print(f"charlm: error: {exc}", markup=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
