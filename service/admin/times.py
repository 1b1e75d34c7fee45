"""The time range operators type (`--since`, `--until`, `?since=&until=`), and how /admin/
shows a moment."""

from __future__ import annotations

import datetime as dt
import re
import time

from service.errors import AdminInputError

LEAP_SECOND = re.compile(r"(?<=\d\d:\d\d):60(?=$|[.Z+-])")


def parse_time(value: str, *, end_of_day: bool = False) -> dt.datetime:
    """`2026-11-01` (a whole UTC day) or an ISO 8601 time; a time without a zone is UTC."""
    text = LEAP_SECOND.sub(":59", value.strip().upper())  # RFC 3339 allows 't', 'z' and :60
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(day, dt.time(), dt.UTC)
            return moment + dt.timedelta(days=1) if end_of_day and day < dt.date.max else moment
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AdminInputError(
            f"{value!r} is not a date (2026-11-01) or an ISO 8601 time (2026-11-01T09:30:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _epoch_ms(moment: dt.datetime) -> int:
    try:
        return int(moment.timestamp() * 1000)
    except (OverflowError, ValueError):  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise AdminInputError(f"{moment.isoformat()} is out of range") from None


def time_range(since: str | None, until: str | None) -> tuple[int, int]:
    """Milliseconds [since, until): defaults are the beginning of time and now."""
    start = max(0, _epoch_ms(parse_time(since))) if since else 0
    end = _epoch_ms(parse_time(until, end_of_day=True)) if until else int(time.time() * 1000) + 1
    if end <= start:
        raise AdminInputError("the range is empty: --until must be after --since")
    return start, end


def iso_ms(ms: int | str | None) -> str | None:
    """An epoch in milliseconds as ISO 8601; None when absent or past what a date can show
    (a record written before such values were refused must not break the view)."""
    value = int(ms or 0)
    if not value:
        return None
    try:
        moment = dt.datetime.fromtimestamp(value / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds")
