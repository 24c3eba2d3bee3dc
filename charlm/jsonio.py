"""JSON in and out, strictly: what charlm writes is standard JSON, and what it reads from a file
someone handed it (checkpoint metadata) is parsed without trusting its shape.

* ``dumps`` never writes ``NaN``/``Infinity`` (not JSON; most readers reject them): a non-finite
  number becomes ``null``.
* ``loads`` turns every way a document can break the parser (bad UTF-8, syntax, nesting so deep
  that Python's recursive decoder overflows) into ``ValueError``, and refuses nesting deeper than
  ``MAX_DEPTH``, so no later ``repr`` or walk over the value can recurse without bound.
"""
from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float inside it replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """Standard JSON: NaN and ±Infinity are written as ``null``."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


def loads(text: str | bytes, *, unique_keys: bool = False) -> Any:
    """Parse untrusted JSON; raise ``ValueError`` saying why it cannot be used. ``unique_keys``
    refuses an object that names a key twice (which standard JSON leaves undefined)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({str(exc)[:80]})") from None
    if depth(value) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return value


def depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            stack.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return value
