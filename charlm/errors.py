"""Every error charlm raises on purpose. Only the CLI (``charlm/cli``) turns them into messages and exit codes."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class CharlmError(Exception):
    """Base class: a failed operation (exit code 1)."""

    exit_code = 1


class UsageError(CharlmError):
    """The user asked for something that cannot work as asked (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """An option value is out of range or options conflict."""


class CorpusError(CharlmError):
    """A text file cannot be read as a corpus."""


class TokenizerError(CharlmError):
    """Text cannot be encoded, or a tokenizer description is invalid."""


class CheckpointError(CharlmError):
    """A checkpoint is missing, unreadable, or does not describe a charlm model."""


class DeviceError(UsageError):
    """The requested device is not available on this machine."""


class TrainingError(CharlmError):
    """Training cannot go on (e.g. the loss kept being NaN/Inf)."""


class SaveError(CharlmError):
    """A checkpoint could not be written; the previous one is intact."""


class OutOfMemoryError(CharlmError):
    """The model, a batch or a set of samples does not fit in memory (the message says what to shrink)."""


class RunInUseError(UsageError):
    """Another charlm process is training in the same run folder."""


class Cancelled(CharlmError):
    """A long computation was asked to stop (its ``should_stop`` said so) before it finished."""


def stop_if_asked(should_stop: "Callable[[], bool] | None") -> None:
    """Raise ``Cancelled`` if ``should_stop`` (a long computation's, polled between windows) says so."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped before it finished")


class SamplingError(CharlmError):
    """The model's output cannot be sampled from (NaN scores: its weights overflow)."""


class DistributedError(TrainingError):
    """Another process of a distributed run died or stopped responding, or the group cannot form."""


# ── corpora, plots and export ───────────────────────────────────────────────────────────────────

class DownloadError(CharlmError):
    """A corpus file cannot be downloaded (offline, DNS failure, HTTP error, connection dropped)."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its published checksum; the bad file has been removed."""


class MissingDependencyError(CharlmError):
    """An optional feature needs a package that is not installed (the message says which extra)."""


class MetricsError(CharlmError):
    """A run folder has no readable metrics.jsonl to plot."""


class ExportError(CharlmError):
    """A model cannot be exported, or the exported graph does not reproduce the model."""


# ── running out of memory ───────────────────────────────────────────────────────────────────────

# How PyTorch's allocators word a failed allocation: the CPU allocator raises a plain RuntimeError,
# CUDA and MPS raise torch.OutOfMemoryError (a RuntimeError subclass).
_OUT_OF_MEMORY_MARKS = ("out of memory", "can't allocate memory", "not enough memory", "bad_alloc",
                        "Cannot allocate memory", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return not isinstance(exc, CharlmError)
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _OUT_OF_MEMORY_MARKS)


@contextmanager
def out_of_memory_as(doing: str, hint: str = "") -> Iterator[None]:
    """Turn running out of memory inside the block into ``OutOfMemoryError``: "out of memory
    {doing}; {hint}". Everything else passes through unchanged."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        _release_cached_memory()
        raise OutOfMemoryError(f"out of memory {doing}" + (f"; {hint}" if hint else "")) from None


def _release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
