"""Ids as Salla sends them and as operators type them: positive whole numbers in ASCII digits.

Python's `int()` and `str.isdigit()` take any Unicode digit: `int("١٢٣") == 123` (Arabic-Indic
digits) and `"²".isdigit()` is true while `int("²")` raises. Neither may therefore decide what an
id is, or "١٢٣" becomes store 123 and "²" an unexpected error. Every place that reads an id (the
webhook envelope, the payload's order and customer ids, admin paths and queries, the CLI) reads
it here. An id fits in a signed 64-bit integer, as Salla's do; anything longer is not an id
(and never reaches `int()`, which refuses strings of more than 4,300 digits with a ValueError).
"""

from __future__ import annotations

from typing import Any

import click

MAX_ID = 2**63 - 1
MAX_DIGITS = len(str(MAX_ID))  # 19

#: What an id is, in the words every refusal uses.
WHAT_AN_ID_IS = "a positive whole number of at most 19 ASCII digits, 0-9"


def parse_id(value: object) -> int | None:
    """A JSON integer, or a string of ASCII digits (spaces around allowed), from 1 to 2**63-1;
    None for anything else (booleans, floats, other digits, signs, too long)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= MAX_ID else None
    if isinstance(value, str):
        parsed = parse_digits(value.strip())
        return parsed if parsed is not None and 0 < parsed <= MAX_ID else None
    return None


def parse_digits(text: str, max_digits: int = MAX_DIGITS) -> int | None:
    """A non-negative whole number written in at most `max_digits` ASCII digits, or None.

    For counts in headers and settings as much as for ids: "٣" and "²" are not numbers here.
    """
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


class _IdParam(click.ParamType[int]):
    """A store, order or customer id on the command line: click's `int` would take "١٢٣" as
    123 and answer a 5,000-digit id with a traceback."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        parsed = parse_id(value)
        if parsed is None:
            shown = str(value) if len(str(value)) <= 24 else str(value)[:24] + "..."
            self.fail(f"{shown!r} is not an id ({WHAT_AN_ID_IS})", param, ctx)
        return parsed


#: `type=ID` for every id a command takes.
ID = _IdParam()
