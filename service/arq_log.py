"""arq's job lines, made fit for our log: named events with fields, never a job's arguments.

arq's worker logs each job as text: `0.01s → <job id>:process_event(b'{"data": {"access_token"…)`
holds the first 80 characters of the job's arguments, which for an `app.store.authorize` are
most of the store's access token. arq has a switch for results (`log_results`, off in
`service.worker`) but none for arguments, so this filter on arq's `arq.worker` logger rewrites
the lines it knows, by their format string, into events built from the job's reference and
timings only:

    job_started   job_id, function, queued_s (and job_try, delayed_s when arq says so)
    job_finished  job_id, function, duration_s
    job_retrying  job_id, function, duration_s, retry_in_s
    job_cancelled job_id, function, duration_s (arq runs it again)
    job_aborted   job_id, function, duration_s
    job_failed    job_id, function, duration_s, error (the exception is attached)
    job_max_tries_exceeded  job_id, function, queued_s, max_tries

Routine cron runs (`cron:sweep` every 5 s) and arq's health heartbeat are lowered to DEBUG:
they were most of a quiet worker's log. A cron run that fails or retries keeps its level.
arq's other lines (start-up, Redis info, shutdown) pass as they are. The format strings are
arq 0.28's (`arq/worker.py`); tests run a real worker, so an upgrade that changes them fails
the suite (a job's token in a log line) instead of leaking quietly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from service.logging import RECORD_FIELDS

_Fields = dict[str, Any]
#: arq's arguments -> (event, fields); the `ref` is `<job id>:<function>` or a cron's name.
_Translation = Callable[[tuple[Any, ...]], tuple[str, _Fields]]

_EXTRA = re.compile(r"try=(?P<try>\d+)|delayed=(?P<delayed>[\d.]+)s")


def _job(ref: Any) -> _Fields:
    ref = str(ref)
    if ref.startswith("cron:"):  # arq logs a cron job by its function name alone
        return {"function": ref}
    job_id, _, function = ref.rpartition(":")
    return {"job_id": job_id, "function": function}


def _seconds(value: Any) -> float:
    return round(float(value), 3)


def _started(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    queued_s, ref, _arguments, extra = args  # the arguments are dropped here, unread
    fields = {**_job(ref), "queued_s": _seconds(queued_s)}
    for match in _EXTRA.finditer(str(extra)):
        if match["try"]:
            fields["job_try"] = int(match["try"])
        if match["delayed"]:
            fields["delayed_s"] = float(match["delayed"])
    return "job_started", fields


def _finished(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    duration_s, ref, _result = args  # `log_results=False` makes it empty; dropped regardless
    return "job_finished", {**_job(ref), "duration_s": _seconds(duration_s)}


def _retrying(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    duration_s, ref, retry_in_s = args
    fields = {**_job(ref), "duration_s": _seconds(duration_s), "retry_in_s": _seconds(retry_in_s)}
    return "job_retrying", fields


def _timed(event: str) -> _Translation:
    def translate(args: tuple[Any, ...]) -> tuple[str, _Fields]:
        duration_s, ref = args
        return event, {**_job(ref), "duration_s": _seconds(duration_s)}

    return translate


def _aborted_before_start(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    queued_s, job_id, function = args
    return "job_aborted", {"job_id": job_id, "function": function, "queued_s": _seconds(queued_s)}


def _failed(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    duration_s, ref, error_type, error = args
    fields = {**_job(ref), "duration_s": _seconds(duration_s), "error": f"{error_type}: {error}"}
    return "job_failed", fields


def _max_tries(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    queued_s, ref, max_tries = args
    fields = {**_job(ref), "queued_s": _seconds(queued_s), "max_tries": max_tries}
    return "job_max_tries_exceeded", fields


def _health(args: tuple[Any, ...]) -> tuple[str, _Fields]:
    return "worker_health", {"detail": str(args[0])}


#: arq 0.28's format strings (arq/worker.py) and what each becomes.
_TRANSLATIONS: dict[str, _Translation] = {
    "%6.2fs → %s(%s)%s": _started,
    "%6.2fs ← %s ● %s": _finished,
    "%6.2fs ↻ %s retrying job in %0.2fs": _retrying,
    "%6.2fs ↻ %s cancelled, will be run again": _timed("job_cancelled"),
    "%6.2fs ⊘ %s aborted": _timed("job_aborted"),
    "%6.2fs ⊘ %s:%s aborted before start": _aborted_before_start,
    "%6.2fs ! %s failed, %s: %s": _failed,
    "%6.2fs ! %s max retries %d exceeded": _max_tries,
    "recording health: %s": _health,
}

#: A cron job's events that are routine (its failures and retries are not).
_ROUTINE_FOR_CRON = {"job_started", "job_finished"}


class ArqJobLines(logging.Filter):
    """Rewrites arq's job lines in place (a filter on the `arq.worker` logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        translate = _TRANSLATIONS.get(record.msg) if isinstance(record.msg, str) else None
        if translate is None or not isinstance(record.args, tuple):
            return True
        event, fields = translate(record.args)
        record.msg, record.args = event, ()
        setattr(record, RECORD_FIELDS, fields)
        routine = event == "worker_health" or (
            event in _ROUTINE_FOR_CRON and str(fields.get("function", "")).startswith("cron:")
        )
        if routine and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def install() -> None:
    """Put the filter on arq's worker logger (once per process)."""
    logger = logging.getLogger("arq.worker")
    if not any(isinstance(f, ArqJobLines) for f in logger.filters):
        logger.addFilter(ArqJobLines())
