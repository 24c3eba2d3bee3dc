"""What the CLI writes and how it fails: safe consoles for text from files, a standard output that
can vanish, and library errors turned into one line on stderr and an exit code."""
from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from charlm.errors import CharlmError, UsageError, is_out_of_memory

# Control characters a terminal would obey (ESC starts colour, title and clipboard sequences; CR
# and BS overwrite; the bidirectional overrides reorder what is shown), C1 controls and DEL.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe_text(text: str) -> str:
    """``text`` as a terminal shows it without obeying it: control characters written as escapes
    (``\\x1b``, ``\\u202e``); newlines and tabs kept. Every string from a file passes through this."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class _SafeConsole(Console):
    """A console that prints strings as text: no markup (a ``[`` in a path is a bracket) and no
    control characters (``safe_text``)."""

    def print(self, *objects: Any, **options: Any) -> None:  # noqa: A003 - rich's name
        options.setdefault("markup", False)
        super().print(*(_safe_renderable(o) for o in objects), **options)


def _safe_renderable(value: Any) -> Any:
    if isinstance(value, Text):
        return Text(safe_text(value.plain), style=value.style, justify=value.justify, overflow=value.overflow)
    return safe_text(value) if isinstance(value, str) else value


class SafeTable(Table):
    """A table whose cells are text, never markup, with control characters escaped."""

    def add_row(self, *cells: Any, **options: Any) -> None:
        super().add_row(*(Text(safe_text(c)) if isinstance(c, str) else _safe_renderable(c) for c in cells),
                        **options)


err = _SafeConsole(stderr=True, highlight=False, soft_wrap=True, markup=False)
console = _SafeConsole(highlight=False, soft_wrap=True, markup=False)


def _error(message: str, code: int) -> typer.Exit:
    err.print(f"charlm: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; never a traceback."""
    try:
        yield
        flush_stdout()  # a full disk or a closed pipe shows here, not at exit after the message
    except CharlmError as exc:
        raise _error(str(exc), exc.exit_code) from None
    except KeyboardInterrupt as exc:
        err.print(f"charlm: interrupted{f' ({exc})' if isinstance(exc, Signalled) else ''}", markup=False)
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    except OutputLost as exc:
        raise _error(str(exc), 1) from None
    except (MemoryError, RuntimeError) as exc:
        # The library names what ran out where it can (OutOfMemoryError); anything it did not
        # wrap still ends as one line, not an allocator's traceback.
        if not is_out_of_memory(exc):
            raise
        raise _error("out of memory; make the model (--hidden-size, --num-layers), --batch-size or "
                     "--num-samples smaller", 1) from None


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM before training started: nothing to save, so the work stops at once
    (``handled`` names the signal and exits 130 or 143)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.exit_code = 143 if name == "SIGTERM" else 130


# ── standard output that can vanish ────────────────────────────────────────────────────────────

class OutputLost(Exception):
    """Standard output cannot take what a command writes: closed, a full disk, a reader gone."""


_OUTPUT_REASONS = {errno.EPIPE: "the reader went away (broken pipe)", errno.ENOSPC: "no space left on the device",
                   errno.EBADF: "it is closed"}


class GuardedStdout:
    """``sys.stdout`` while a command runs: a failed write or flush becomes ``OutputLost``, and
    the real descriptor is then pointed at /dev/null so that the flush at exit stays quiet."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _lost(self, exc: OSError) -> OutputLost:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        reason = _OUTPUT_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        return OutputLost(f"cannot write to standard output: {reason}")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise self._lost(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._lost(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def flush_stdout() -> None:
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as exc:  # not guarded (a library caller's own stream)
            raise OutputLost(f"cannot write to standard output: "
                             f"{_OUTPUT_REASONS.get(exc.errno or 0, exc.strerror or str(exc))}") from None


def write_text(text: str) -> None:
    """Generated text to stdout: as it is into a file or pipe, with control characters escaped
    on a terminal (a downloaded model's vocabulary can hold escape sequences)."""
    sys.stdout.write(safe_text(text) if _stdout_is_terminal() else text)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def usage_error(message: str) -> UsageError:
    """A usage error (exit 2) for a combination of options the command itself refuses."""
    return UsageError(message)

