"""The native routes' requests: their fields and defaults, each field's check (a 422 with a one-line
message), and the token bounds on primes and scored texts, counted a piece at a time so a large
text stops being read when its client leaves."""
from __future__ import annotations

import secrets
import threading
from typing import Any

from charlm.api import LanguageModel
from charlm.config import LIMITS, brief
from charlm.errors import Cancelled
from charlm.infer.sample import prime_ids
from charlm.serve.http import Problem
from charlm.serve.limits import ServeLimits

def fields(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``body`` over ``defaults``; a field this endpoint does not know is refused, not ignored."""
    unknown = [key for key in body if key not in defaults]
    if unknown:
        raise Problem(422, f"unknown field {brief(unknown[0])}; the fields are {', '.join(defaults)}")
    return {**defaults, **body}


def _number(values: dict[str, Any], name: str, *, optional: bool = False, rule: str | None = None) -> None:
    value = values[name]
    if value is None and optional:
        return
    limit = LIMITS[rule or name]
    if not limit.allows(value):
        raise Problem(422, f"{name} must be {limit.describe()}{' or null' if optional else ''} (got {brief(value)})")


def _flag(values: dict[str, Any], name: str) -> None:
    if not isinstance(values[name], bool):
        raise Problem(422, f"{name} must be true or false (got {brief(values[name])})")


def _string(values: dict[str, Any], name: str, *, optional: bool = False, nonempty: bool = False) -> None:
    value = values[name]
    if value is None and optional:
        return
    if not isinstance(value, str) or (nonempty and not value):
        raise Problem(422, f"{name} must be a {'non-empty ' if nonempty else ''}string"
                            f"{' or null' if optional else ''} (got {brief(value)})")


def _at_most(values: dict[str, Any], name: str, bound: int, option: str) -> None:
    if values[name] > bound:
        raise Problem(422, f"{name} must be ≤ {bound:,} on this server ({option}; got {values[name]:,})")


def _top(values: dict[str, Any], vocab_size: int, given: bool) -> None:
    if given and not values["logprobs"]:
        raise Problem(422, "top is the number of alternatives shown with logprobs; give \"logprobs\": true too")
    top = values["top"]
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= min(20, vocab_size):
        raise Problem(422, f"top must be a whole number in [0, {min(20, vocab_size)}] (got {brief(top)})")


GENERATE_FIELDS: dict[str, Any] = {"prime": "", "length": 500, "temperature": 0.8, "top_k": None, "top_p": None,
                                   "seed": None, "stop": None, "num_samples": 1, "stream": False}
SCORE_FIELDS: dict[str, Any] = {"lines": None, "include_end": True, "logprobs": False, "top": 5}
PERPLEXITY_FIELDS: dict[str, Any] = {"text": None, "logprobs": False, "top": 5, "cache": True}


def generate_options(body: dict[str, Any], lm: LanguageModel, limits: ServeLimits, *,
                     read_prime: bool = True) -> dict[str, Any]:
    """The checked keyword arguments of ``LanguageModel.stream``, and ``stream``. ``read_prime``:
    check the prime here too (else the caller runs ``check_prime`` off the event loop)."""
    values = fields(body, GENERATE_FIELDS)
    _string(values, "prime")
    _string(values, "stop", optional=True, nonempty=True)
    for name in ("length", "temperature", "num_samples"):
        _number(values, name)
    for name in ("top_k", "top_p", "seed"):
        _number(values, name, optional=True)
    _flag(values, "stream")
    _at_most(values, "length", limits.max_length, "--max-length")
    _at_most(values, "num_samples", limits.max_samples, "--max-samples")
    if read_prime:
        check_prime(values["prime"], lm, limits)
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**63)
    return values


def check_prime(prime: str, lm: LanguageModel, limits: ServeLimits, cancel: threading.Event | None = None) -> None:
    """A prime the model cannot read, or longer than --max-tokens, is a 422 before any stream
    starts. Counted a piece at a time, so a large one stops when ``cancel`` is set."""
    bound = f"this server takes at most {limits.max_tokens:,} (--max-tokens)"
    total = 0
    for piece in pieces_of(prime):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the request was cancelled")
        total += len(lm.tokenizer.encode(piece))
        if total > limits.max_tokens + 1:  # + 1: a word model's prime mid-line does not read its <EOS>
            raise Problem(422, f"the prime is over {limits.max_tokens:,} tokens; {bound}")
    tokens = len(prime_ids(lm.tokenizer, prime))
    if tokens > limits.max_tokens:
        raise Problem(422, f"the prime is {tokens:,} tokens; {bound}")


def check_texts(texts: list[str], lm: LanguageModel, limits: ServeLimits, cancel: threading.Event) -> None:
    """Refuse texts of more than --max-tokens tokens in all, as generation's primes are; counted
    a piece at a time, so a large body's tokenizing stops when its client leaves."""
    total = 0
    for text in texts:
        for piece in pieces_of(text):
            if cancel.is_set():
                raise Cancelled("the request was cancelled")
            total += len(lm.tokenizer.encode(piece))
            if total > limits.max_tokens:
                raise Problem(422, f"the text is over {limits.max_tokens:,} tokens; this server reads at most "
                                    f"{limits.max_tokens:,} per request (--max-tokens)")


def check_score(values: dict[str, Any], given: set[str], vocab_size: int) -> None:
    lines = values["lines"]
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise Problem(422, f"lines must be a list of strings (got {brief(lines)})")
    _flag(values, "include_end")
    _flag(values, "logprobs")
    _top(values, vocab_size, "top" in given)


def check_perplexity(values: dict[str, Any], given: set[str], vocab_size: int) -> None:
    _string(values, "text")
    _flag(values, "logprobs")
    _flag(values, "cache")
    _top(values, vocab_size, "top" in given)


def pieces_of(text: str, size: int = 1 << 16) -> list[str]:
    """``text`` cut after line ends into pieces of about ``size`` characters (a tokenizer reads
    each the same as within the whole; a line longer than ``size`` is one piece)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces
