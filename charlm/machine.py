"""What this machine answered when asked: whether a kernel runs, which of two implementations is
faster. Each answer is measured once per machine and torch version and kept in the cache folder
(``kernels.json``, next to the token cache), so a decision follows the machine charlm runs on rather
than a table from the machines it was tuned on. ``charlm bench`` shows every kept answer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from charlm.cpu import cpu_flags, simulating_no_bf16
from charlm.errors import CharlmError
from charlm.fsutil import atomic_write, cache_root

STORE = "kernels.json"


def machine_key() -> str:
    """This machine and torch build: the CPU's flags (hashed), its architecture, torch's version."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return f"torch {torch.__version__} {platform.machine()} flags {flags}"


def _path() -> Path:
    return cache_root() / STORE


def _read() -> dict[str, Any]:
    try:
        known = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def answers() -> dict[str, dict[str, Any]]:
    """Every answer kept for this machine, by section and key."""
    mine = _read().get(machine_key())
    return {section: dict(entries) for section, entries in mine.items() if isinstance(entries, dict)} \
        if isinstance(mine, dict) else {}


# This process's answers, by (section, key, whether the CPU is played): read or measured once.
_ANSWERS: dict[tuple[str, str, bool], Any] = {}


def remembered(section: str, key: str, compute: Callable[[], Any], *,
               valid: Callable[[Any], bool] = lambda answer: True) -> Any:
    """``compute()``'s answer (JSON-able) for ``key``, computed once per machine: kept in the cache
    folder and in this process. A kept answer that ``valid`` refuses is computed again. Playing a
    CPU without bf16 kernels (``CHARLM_SIMULATE_NO_BF16``) keeps nothing on disk."""
    simulated = simulating_no_bf16()
    slot = (section, key, simulated)
    if slot in _ANSWERS:
        return _ANSWERS[slot]
    kept = {} if simulated else answers().get(section, {})
    if key in kept and valid(kept[key]):
        _ANSWERS[slot] = kept[key]
        return kept[key]
    answer = _ANSWERS[slot] = compute()
    if not simulated:
        known = _read()
        mine = known.get(machine_key())
        mine = mine if isinstance(mine, dict) else {}
        entries = mine.get(section)
        entries = entries if isinstance(entries, dict) else {}
        known[machine_key()] = {**mine, section: {**entries, key: answer}}
        # A cache folder that cannot be written (or holds a planted link) costs a measurement per process.
        with contextlib.suppress(OSError, CharlmError):
            atomic_write(_path(), json.dumps(known, indent=1).encode("utf-8"))
    return answer


def forget() -> None:
    """Drop this process's answers (the kept file stays): for tests."""
    _ANSWERS.clear()


def alternated(rounds: int, *measures: Callable[[], float]) -> list[float]:
    """Each measure's median over ``rounds`` rounds in which the measures take turns, so a machine
    whose speed drifts affects each alike: what every A-against-B timing here is made of."""
    results = [[measure() for measure in measures] for _ in range(rounds)]
    return [statistics.median(values) for values in zip(*results)]


def milliseconds(run: Callable[[], Any], *, calls: int = 1, warm: int = 0) -> Callable[[], float]:
    """A measure for ``alternated``: ``warm`` calls of ``run`` untimed, then milliseconds per call
    over ``calls`` more."""
    def measure() -> float:
        for _ in range(warm):
            run()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - start) / calls * 1e3
    return measure
