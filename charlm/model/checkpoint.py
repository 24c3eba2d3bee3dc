"""Atomic save and validated load of ``.safetensors`` checkpoints.

One file holds the weights (PyTorch parameter names, tied weights stored once) and JSON metadata:
``format`` = ``charlm/1``, ``model_config``, ``tokenizer``, ``train_config``, ``train_state``, and
``cache_pointer`` where the trainer fitted one (pointer.py).
Optimizer state, RNG state and the carried hidden state, which only ``--resume`` needs, go in a
sibling ``*.optim.safetensors`` named in ``train_state["optim_file"]``.

Nothing here unpickles: safetensors is a JSON header plus raw tensor bytes, and we check the
header ourselves before handing the file to the safetensors reader.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from charlm import jsonio
from charlm.config import CachePointer, ModelConfig, TrainConfig, brief
from charlm.config import ENCODING_ERRORS
from charlm.data.tokenizer import Tokenizer, tokenizer_from_dict
from charlm.errors import CheckpointError, ConfigError, TokenizerError, out_of_memory_as
from charlm.fsutil import atomic_write
from charlm.model.lm import RNNLM, parameter_shapes

FORMAT = "charlm/1"
BEST = "best.safetensors"
LAST = "last.safetensors"
CACHE_KEY = "cache_pointer"
MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


@dataclass
class Checkpoint:
    model: RNNLM
    tokenizer: Tokenizer
    model_config: ModelConfig
    train_config: TrainConfig | None
    train_state: dict[str, Any]
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    cache: CachePointer | None = None  # the cache pointer fitted when training ended (pointer.py)


def checkpoint_report(checkpoint: Checkpoint) -> dict[str, Any]:
    """What ``charlm info --json`` prints and ``GET /v1/model`` answers: configs, vocabulary size,
    parameters and training state, all JSON-ready."""
    return {
        "checkpoint": str(checkpoint.path), "format": checkpoint.metadata.get("format"),
        "parameters": checkpoint.model.num_parameters(), "tokenizer": checkpoint.tokenizer.kind,
        "vocab_size": checkpoint.tokenizer.vocab_size, "model_config": checkpoint.model_config.to_dict(),
        "train_config": checkpoint.train_config.to_dict() if checkpoint.train_config else None,
        "train_state": checkpoint.train_state,
        "cache_pointer": checkpoint.cache.to_dict() if checkpoint.cache else None,
    }


# ── writing ─────────────────────────────────────────────────────────────────────────────────────

def model_tensors(model: RNNLM) -> dict[str, Any]:
    """The model's tensors by PyTorch name, tied weights once, contiguous fp32 on the CPU."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_weights and name == "head.weight":
            continue
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return tensors


def save_checkpoint(path: str | os.PathLike[str], *, model: RNNLM, tokenizer: Tokenizer,
                    train_config: TrainConfig | None = None, train_state: dict[str, Any] | None = None) -> Path:
    metadata = {
        "format": FORMAT,
        "model_config": jsonio.dumps(model.cfg.to_dict()),
        "tokenizer": jsonio.dumps(tokenizer.to_dict(), ensure_ascii=False),
        "train_config": jsonio.dumps(train_config.to_dict() if train_config else None),
        "train_state": jsonio.dumps(train_state or {}),
    }
    path = Path(path)
    atomic_write(path, save(model_tensors(model), metadata=metadata))
    return path


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    path = Path(path)
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))
    return path


# ── reading ─────────────────────────────────────────────────────────────────────────────────────

def read_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header without trusting anything in it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header claims {header_len:,} bytes)")
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                      f"(header of {header_len:,} bytes in a {size:,}-byte file)")
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = jsonio.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(_whole(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        numel = 1
        for d in shape:
            numel *= d
        start, end = offsets
        if not 0 <= start <= end <= data_len or end - start != numel * _DTYPE_SIZES[info["dtype"]]:
            raise CheckpointError(f"{path}: truncated or corrupted (tensor {name!r} lies outside the data)")
    return header


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_field(path: Path, metadata: dict[str, str], key: str) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{path}: metadata lacks {key!r}")
    try:
        return jsonio.loads(metadata[key])
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is {exc}" if "nested" in str(exc)
                              else f"{path}: metadata {key!r} is not valid JSON") from None


# What the trainer writes in ``train_state``; a field may be absent (an older or foreign writer),
# but one that is present must have its type. Losses may be null (no evaluation yet).
_STATE_COUNTS = ("step", "epoch", "window", "evals_since_best", "total_steps", "warmup_steps", "tokens_seen",
                 "num_parameters", "world_size")
_STATE_LOSSES = ("best_val_loss", "val_loss")
_STATE_TEXTS = ("corpus", "val_corpus", "optim_file", "stopped_by", "corpus_digest")


def check_train_state(path: Path, state: Any) -> dict[str, Any]:
    """The ``train_state`` object with each known field checked; null losses read as +inf."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: metadata 'train_state' must be a JSON object")
    state = dict(state)

    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: train_state {key!r} must be {what} (got {brief(state[key])})")

    for key in _STATE_COUNTS:
        if key in state and not (_whole(state[key]) and state[key] <= 2**63 - 1):
            raise bad(key, "a whole number ≥ 0")
    if "best_step" in state and not (isinstance(state["best_step"], int) and not isinstance(state["best_step"], bool)
                                     and -1 <= state["best_step"] <= 2**63 - 1):
        raise bad("best_step", "a whole number ≥ -1")
    for key in _STATE_LOSSES:
        if key in state:
            value = state[key]
            if value is None:
                state[key] = math.inf
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                raise bad(key, "a number or null")
    for key in ("elapsed_seconds", "average_total"):  # average_total: the sum of --average's step weights
        value = state.get(key)
        if key in state and (not isinstance(value, (int, float)) or isinstance(value, bool)
                             or not 0 <= value < math.inf):
            raise bad(key, "a finite number ≥ 0")
    for key in ("include", "exclude"):
        patterns = state.get(key)
        if patterns is not None and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
            raise bad(key, "a list of file name patterns")
    for key in _STATE_TEXTS:
        if key in state and state[key] is not None and not isinstance(state[key], str):
            raise bad(key, "a string or null")
    if "encoding_errors" in state and state["encoding_errors"] not in ENCODING_ERRORS:
        raise bad("encoding_errors", f"one of {', '.join(ENCODING_ERRORS)}")
    return state


def stored_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of this config holds (tied weights once), by name."""
    shapes = parameter_shapes(model_config)
    if model_config.tie_weights:
        del shapes["head.weight"]
    return shapes


def load_checkpoint(path: str | os.PathLike[str], *, device: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint file; raise ``CheckpointError`` saying what is wrong.

    Nothing is allocated from what the metadata claims until every tensor it implies has been
    found in the file with that shape: the model's memory is then the file's own data (twice
    that for a half-precision file, whose tensors are widened to float32).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a .safetensors file or use resolve_checkpoint")
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        raise CheckpointError(f"{path}: not a charlm checkpoint (format tag {brief(found)}, expected {FORMAT!r})"
                              if found else f"{path}: not a charlm checkpoint (no 'format' metadata)")
    try:
        model_config = ModelConfig.from_dict(_json_field(path, metadata, "model_config"))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid metadata: {exc}") from None

    expected = stored_shapes(model_config)
    names = {k for k in header if k != "__metadata__"}
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(brief(name) for name in unexpected[:5])}")
        raise CheckpointError(f"{path}: tensors do not match the model config ({'; '.join(parts)})")
    for name, shape in expected.items():
        info = header[name]
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {brief(tuple(info['shape']))}, "
                                  f"the config implies {shape}")
        if info["dtype"] not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, expected a float type")

    try:
        tokenizer = tokenizer_from_dict(_json_field(path, metadata, "tokenizer"))
        raw_train = _json_field(path, metadata, "train_config")
        train_config = TrainConfig.from_dict(raw_train) if raw_train is not None else None
        raw_cache = _json_field(path, metadata, CACHE_KEY) if CACHE_KEY in metadata else None
        cache = CachePointer.from_dict(raw_cache) if raw_cache is not None else None
    except (ConfigError, TokenizerError) as exc:
        raise CheckpointError(f"{path}: invalid metadata: {exc}") from None
    train_state = check_train_state(path, _json_field(path, metadata, "train_state"))
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                              f"{model_config.vocab_size}")

    with out_of_memory_as(f"loading {path} (a {path.stat().st_size:,}-byte checkpoint)"):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf")
        # Built on the meta device (no memory), then the file's tensors become the parameters.
        with torch.device("meta"):
            model = RNNLM(model_config)
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False, assign=True)
        if model_config.tie_weights:
            model.head.weight = model.embedding.weight
        model.to(device)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, model_config=model_config, train_config=train_config,
                      train_state=train_state, path=path, metadata=dict(metadata), cache=cache)


def store_cache(path: Path, cache: CachePointer | None) -> None:
    """Rewrite checkpoint ``path`` (atomically) with ``cache`` in its metadata, or without one."""
    tensors, metadata = load_tensors(path)
    metadata.pop(CACHE_KEY, None)
    if cache is not None:
        metadata[CACHE_KEY] = jsonio.dumps(cache.to_dict())
    save_tensors(path, tensors, metadata)


def load_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A plain, checked safetensors file (used for optimizer state)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    header = read_header(path)
    try:
        return load_file(str(path)), dict(header.get("__metadata__") or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None


def resolve_checkpoint(where: str | os.PathLike[str] | None, *, root: str | os.PathLike[str] = "checkpoints",
                       prefer: str = BEST) -> Path:
    """A checkpoint file from a file path, a run folder, or (None) the newest run under ``root``."""
    if where is None:
        root = Path(root)
        runs = [p for p in root.glob("*/") if (p / BEST).is_file() or (p / LAST).is_file()] if root.is_dir() else []
        if not runs:
            raise CheckpointError(f"no checkpoint under {root}/; train one first ('charlm train', charlm.train) "
                                  f"or name a checkpoint file or run folder")
        where = max(runs, key=lambda p: max(f.stat().st_mtime for f in (p / BEST, p / LAST) if f.is_file()))
    where = Path(where)
    if where.is_dir():
        order = (BEST, LAST) if prefer == BEST else (LAST, BEST)
        for name in order:
            if (where / name).is_file():
                return where / name
        raise CheckpointError(f"{where}: run folder has no checkpoint ({BEST} or {LAST})")
    if not where.exists():
        raise CheckpointError(f"{where}: no such checkpoint")
    return where
