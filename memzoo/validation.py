"""One check for every config field: its type, and the range a design declares for it.

A design declares a knob's range where it declares the knob, in the dataclass field::

    @dataclass
    class KVConfig(MemoryConfig):
        budget: int = field(default=1024, metadata=bounds(ge=1))

and :func:`check_fields` (called by every config's ``__post_init__``) refuses a value of the wrong
type (``True`` for an int, ``"no"`` for a bool, ``nan`` or ``inf`` for a float) or outside its range,
with a message naming the field and what it accepts. Backbone fields, which live in a transformers
config rather than a dataclass, use :func:`check_value` directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

__all__ = ["bounds", "check_fields", "check_value"]


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: tuple | None = None) -> dict:  # fmt: skip
    """Field metadata: the range a numeric field must lie in, or the values a field may take."""
    return {"bounds": {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}}


_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_TESTS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def check_value(name: str, value: Any, kind: Any, where: str = "", **limits) -> None:
    """Raise ``ValueError`` unless ``value`` is of type ``kind`` (``int``, ``float``, ``bool``, ``str``,
    ``X | None``; other types are not checked) and within ``limits`` (:func:`bounds`' keywords)."""
    label = f"{where}{name}"
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else (kind,)
    if value is None:
        if type(None) not in options:
            raise ValueError(f"{label} must be set (got None)")
        return
    options = tuple(o for o in options if o is not type(None))
    if not any(_is(value, o) for o in options):
        wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
        raise ValueError(f"{label} must be {_article(wanted)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    if "choices" in limits and value not in limits["choices"]:
        raise ValueError(f"{label} must be one of {', '.join(map(repr, limits['choices']))}; got {value!r}")
    for key, bound in limits.items():
        if key != "choices" and not _TESTS[key](value, bound):
            raise ValueError(f"{label} must be {_WORDS[key]} {bound}, got {value!r}")


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass against its annotation and its declared :func:`bounds`."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        check_value(f.name, getattr(config, f.name), hints.get(f.name, Any), f"{type(config).__name__}.",
                    **f.metadata.get("bounds", {}))  # fmt: skip


def _is(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # an int is a fine float (budget-like YAML values: 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, type) and kind in (str,):
        return isinstance(value, kind)
    return True  # containers and other types: the design checks them itself


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def unknown_name(kind: str, name: str, names: list[str]) -> ValueError:
    """The error for an unknown ``name`` among ``names``: a case-insensitive did-you-mean, then the list
    (torch-free, so the CLI can check a design's name before importing anything heavy)."""
    by_lower = {n.lower(): n for n in names}  # "Titans-MAC" -> 'titans-mac'
    close = difflib.get_close_matches(str(name).lower(), by_lower, n=1)
    hint = f"did you mean {by_lower[close[0]]!r}? " if close else ""
    return ValueError(f"unknown {kind} {name!r}; {hint}available: {', '.join(sorted(names))}")
