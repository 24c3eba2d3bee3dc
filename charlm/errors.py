"""Every error charlm raises on purpose. Only ``cli.py`` turns them into messages and exit codes."""
from __future__ import annotations


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
