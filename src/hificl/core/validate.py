"""Validation of settings, shared by every config of the package (the core's own config uses it, so it lives
here). Each check returns the value and raises `error` with a message naming the field, the value and what is
expected."""

from __future__ import annotations

import math
from typing import Any, Iterable


def integer(value: Any, name: str, minimum: int | None = 1, *, allow_none: bool = False,
            error: type[Exception] = ValueError) -> int | None:
    """An int (never a bool) of at least `minimum` (None: any int), or None where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        what = "an int" if minimum is None else ("a positive int" if minimum == 1 else f"an int >= {minimum}")
        raise error(f"{name} must be {what}{' or null' if allow_none else ''}, got {value!r}.")
    return value


def number(value: Any, name: str, minimum: float | None = 0.0, *, below: float | None = None,
           positive: bool = False, allow_none: bool = False, error: type[Exception] = ValueError) -> float | None:
    """A finite int or float (never a bool) >= `minimum` (> 0 with `positive`, < `below` if given)."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (not positive or value > 0)
    ok = ok and (below is None or value < below)
    if not ok:
        bounds = [f"> {minimum:g}" if positive else f">= {minimum:g}"] if minimum is not None else []
        bounds += [f"< {below:g}"] if below is not None else []
        hint = " (write a float such as 1.0e-3)" if isinstance(value, str) else ""
        raise error(f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got "
                    f"{value!r}{hint}.")
    return float(value) if isinstance(value, float) else value


def boolean(value: Any, name: str, *, error: type[Exception] = ValueError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {value!r}.")
    return value


def choice(value: Any, name: str, choices: Iterable[Any], *, error: type[Exception] = ValueError) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def known_fields(data: Any, known: Iterable[str], what: str, *, error: type[Exception] = ValueError) -> dict:
    """`data` as a dict whose keys are all in `known` (an error lists the unknown and the known ones)."""
    if not isinstance(data, dict):
        raise error(f"{what} must be a mapping of settings, got {type(data).__name__}: {data!r}.")
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"Unknown {what} field(s) {unknown}; known fields: {sorted(known)}.")
    return data


def unknown_options(owner: str, given: Iterable[str], known: Iterable[str]) -> str:
    """The message for options `owner` does not take: only the unknown ones, then the ones it takes."""
    known = sorted(set(known))
    unknown = sorted(set(given) - set(known))
    takes = f"its options: {', '.join(known)}" if known else "it takes no options"
    return f"{owner} has no option(s) {unknown}; {takes}."
