"""Allowlist checks of parsed JSON (``json.loads`` values) against a schema written as code: each function
checks one value and returns it (or its float), or raises ``Invalid`` with a one-line problem that
quotes keys cut short and names values only as numbers or by their JSON kind. Numbers are judged as
float32 (what the quantizer uses)."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import numpy as np

MAX_TEXT = 1 << 16  # characters of a path, a skip reason, a tool or method description
SHA256 = re.compile(r"[0-9a-f]{64}")


class Invalid(Exception):
    """A problem inside a document; the entry points turn it into ``InputError(path, problem)``."""


@contextmanager
def within_section(prefix: str) -> Iterator[None]:
    """Problems found inside the block read ``{prefix} ({problem})``."""
    try:
        yield
    except Invalid as problem:
        raise Invalid(f"{prefix} ({problem})") from None


def kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"an array of {len(value)}" if isinstance(value, list) else "an object"


def quoted(key: str) -> str:
    """A key from the document, quoted (control characters escaped) and cut short."""
    return repr(key) if len(key) <= 80 else repr(key[:80]) + "..."


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def float32_number(value, what: str) -> float:
    """``value`` if it is a JSON number that is finite as float32 (the document's own value, as a float)."""
    if not is_number(value):
        raise Invalid(f"{what} must be a number (got {kind(value)})")
    if isinstance(value, int) and value.bit_length() > 128:  # float() of it may overflow even float64
        raise Invalid(f"{what}: an integer of {value.bit_length()} bits is not finite as float32")
    value = float(value)
    with np.errstate(over="ignore"):  # the overflow is the finding, not a warning to print
        if not np.isfinite(np.float32(value)):
            raise Invalid(f"{what} = {value:g} is not finite as float32")
    return value


def bounded(value, low: float, high: float, what: str) -> float:
    number = float32_number(value, what)
    if not low <= np.float32(number) <= high:
        raise Invalid(f"{what} = {number:g} is not in [{low:g}, {high:g}]")
    return number


def text_field(value, what: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise Invalid(f"{what} must be a string of at most {MAX_TEXT:,} characters (got {kind(value)})")


def array_of(value, count: int | None, what: str) -> list:
    """``value`` as a JSON array of ``count`` items (None: any number)."""
    if not isinstance(value, list) or count is not None and len(value) != count:
        raise Invalid(f"{what} must be an array{f' of {count}' if count is not None else ''} (got {kind(value)})")
    return value


def fields_of(value, what: str, required: Collection[str], optional: Collection[str] = ()) -> dict:
    """``value`` as a JSON object with every ``required`` field and none beyond ``optional``."""
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be an object (got {kind(value)})")
    missing = [key for key in required if key not in value]
    if missing:
        raise Invalid(f"{what} has no field {missing[0]!r}")
    unknown = next((key for key in value if key not in required and key not in optional), None)
    if unknown is not None:
        raise Invalid(f"{what} has an unknown field {quoted(unknown)}")
    return value


def keys_exactly(value, expected: Collection[str], what: str, item: str, noun: str) -> dict:
    """``value`` (``what``) as a JSON object keyed by exactly the names ``expected``: each a ``noun`` of the
    model, its value an ``item``."""
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be an object (got {kind(value)})")
    missing = [name for name in expected if name not in value]
    if missing:
        raise Invalid(f"no {item} for {noun} {missing[0]!r} ({len(missing)} of {len(expected)} missing)")
    known = set(expected)  # a crafted object may hold millions of keys: one set lookup each, up to the first stranger
    unknown = next((name for name in value if name not in known), None)
    if unknown is not None:
        raise Invalid(f"{quoted(unknown)} is not a {noun} of this model")
    return value


def exact_ints(value, expected: list[int], what: str) -> None:
    """``value`` must be the integers ``expected`` (a shape): no floats, booleans or infinities."""
    if not (isinstance(value, list) and all(type(n) is int for n in value) and value == expected):
        raise Invalid(f"{what} must be {expected}")


def sha256_text(value, what: str) -> None:
    if not (isinstance(value, str) and SHA256.fullmatch(value)):
        raise Invalid(f"{what} must be a sha256 in 64 lowercase hex digits")
