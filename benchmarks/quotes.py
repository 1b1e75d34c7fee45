"""The figures README.md and docs/*.md quote from benchmarks/results.json; `make bench`
rewrites them from each new run, so the docs never hold a figure typed by hand.

A quote is a value followed at once (bold allowed) by a marker naming its key in the file:

    1,891<!--bench:worker.events_per_s-->      a number, written with the decimals it shows
    0.40<!--bench:ingest.rounds_full_bare_ratio[2]#3-->   `[i]` indexes a list; `#n` takes the
                                                n-th number of a text ("1828 / 4555 = 0.40")
    2026-12-02<!--bench:run.date-->            a text, quoted whole

The marker is an HTML comment: invisible once the Markdown is rendered. tests/test_docs.py
checks every quote against the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

QUOTE = re.compile(r"(?P<text>[\w.,:+/-]+)(?P<gap>\**\s*)<!--\s*bench:(?P<key>[\w.\[\]#-]+)\s*-->")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def lookup(results: dict[str, Any], key: str) -> Any:
    """The value a marker names: `section.name`, `[i]` into a list, `#n` the n-th number."""
    path, _, nth = key.partition("#")
    value: Any = results
    for part in path.split("."):
        name, _, index = part.partition("[")
        value = value[name]
        if index:
            value = value[int(index.rstrip("]"))]
    if nth:
        value = float(NUMBER.findall(str(value))[int(nth) - 1].replace(",", ""))
    return value


def formatted(value: Any, like: str) -> str:
    """A number written as `like` is (the same decimals, thousands separated); a text value
    (a date, a commit) as it is, even when it happens to be all digits."""
    if isinstance(value, str) or not NUMBER.fullmatch(like):
        return str(value)
    decimals = len(like.replace(",", "").partition(".")[2])
    return f"{float(value):,.{decimals}f}"


def refresh(text: str, results: dict[str, Any]) -> str:
    """`text` with every quoted figure rewritten from `results`."""

    def one(match: re.Match[str]) -> str:
        marker = match[0][match.end("gap") - match.start() :]
        return formatted(lookup(results, match["key"]), match["text"]) + match["gap"] + marker

    return QUOTE.sub(one, text)


def refresh_docs(root: Path, results: dict[str, Any]) -> list[Path]:
    """Rewrite the quotes in README.md and docs/*.md; the files that changed."""
    changed = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        fresh = refresh(text, results)
        if fresh != text:
            path.write_text(fresh, encoding="utf-8")
            changed.append(path)
    return changed
