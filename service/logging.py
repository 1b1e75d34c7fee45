"""structlog configuration: JSON lines in production, readable lines on a terminal.

Redaction is structural: a processor walks every event dict and masks values whose key names a
secret (tokens, secrets, authorization, passwords) and phone numbers, wherever they are nested.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, cast

import orjson
import structlog
import structlog.testing
from structlog.typing import FilteringBoundLogger

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(
    r"(token|secret|authorization|password|signature|api[_-]?key|mobile|phone)", re.IGNORECASE
)


_PLAIN = frozenset({str, int, float, bool, type(None)})


#: Field name -> whether it names a secret. Log lines use a few dozen names; a plain dict is
#: the cheapest lookup on the per-line path (an `lru_cache` call costs several times more).
#: `event` is the message, never masked, so never looked up: known here, or no line would
#: take the shortcut in `redact`.
_KEY_IS_SECRET: dict[str, bool] = {"event": False}


def _names_secret(key: str) -> bool:
    known = _KEY_IS_SECRET.get(key)
    if known is None:
        known = _SECRET_KEY.search(key) is not None
        if len(_KEY_IS_SECRET) < 4096:  # payload keys can be anything: bounded
            _KEY_IS_SECRET[key] = known
    return known


def _redact_value(key: str, value: Any) -> Any:
    if _names_secret(key):
        return REDACTED
    if type(value) in _PLAIN:  # most fields: nothing nested to walk
        return value
    if isinstance(value, Mapping):
        if _flat_and_known(value):  # our own nested fields (an event's rules): kept as they are
            return value
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def _flat_and_known(value: Mapping[Any, Any]) -> bool:
    known = _KEY_IS_SECRET
    for k, v in value.items():  # noqa: SIM110 - a loop: cheaper than all() over a generator
        if type(v) not in _PLAIN or known.get(k) is not False:
            return False
    return True


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask secret-bearing fields anywhere in the event; the message itself is left alone."""
    known = _KEY_IS_SECRET
    for key, value in event_dict.items():
        if type(value) not in _PLAIN or known.get(key) is not False:  # unknown names: walk
            break
    else:  # most lines: flat fields, none named like a secret; nothing to rewrite
        return event_dict
    for key in list(event_dict):
        # `exc_info` is rendered after this (`_format_exc_info`), and only from a tuple: walked
        # into a list here, a library's or a crash's traceback was silently dropped.
        if key not in _NOT_REDACTED:
            event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


_NOT_REDACTED = frozenset({"event", "exc_info"})


class _UtcStamper:
    """`level` as structlog's `add_log_level` writes it, then `timestamp` as its
    `TimeStamper(fmt="iso", utc=True)` does (ISO 8601, UTC, microseconds, `Z`), in one
    processor, with the date and time of day formatted once per second instead of for every
    line: measured at about 4% of the web process's CPU under load."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["level"] = _LEVEL_NAMES.get(_method, _method)
        now = time.time()
        second = int(now)
        if second != self._second:
            moment = dt.datetime.fromtimestamp(second, dt.UTC)
            self._prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


#: `add_log_level`'s names for the two methods not named after their level.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}

_EXCEPTION_RENDERER = structlog.processors.format_exc_info


def _format_exc_info(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog's `format_exc_info`, called only for the lines that carry an exception."""
    if "exc_info" in event_dict:
        return _EXCEPTION_RENDERER(logger, method, event_dict)
    return event_dict


def _dumps(value: Any, **kwargs: Any) -> bytes:
    """orjson for log lines: several times faster than json, and on the webhook's hot path.
    Bytes, for structlog's `BytesLogger` (no decode, no re-encode)."""
    return orjson.dumps(value, default=kwargs.get("default"), option=orjson.OPT_NON_STR_KEYS)


def _dumps_text(value: Any, **kwargs: Any) -> str:
    """The same JSON as text: `ProcessorFormatter` hands a `str` to the logging handler."""
    return _dumps(value, **kwargs).decode()


#: The `LogRecord` attribute whose dict a library's line adds as fields (see `service.arq_log`).
RECORD_FIELDS = "log_fields"


def _record_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    fields = getattr(event_dict.get("_record"), RECORD_FIELDS, None)
    if fields:
        event_dict.update(fields)
    return event_dict


class _BridgeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler `configure_logging` installs (and replaces when called again). Like
    the standard library's last-resort handler, it writes to whatever `sys.stderr` is when a
    line is written, not to the one there was when it was made (tests swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:
        return sys.stderr


def _bridge_stdlib(use_json: bool, level: int) -> None:
    """Route the standard library's records (uvicorn, arq, asyncio, watchfiles...) through
    structlog's `ProcessorFormatter`: the same level, timestamp, redaction and renderer as our
    own lines, plus `logger` (the library's logger name). Our own lines stay on structlog's
    direct path: the webhook's line must not pay for a `LogRecord`."""
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps_text)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            _record_fields,
            _UtcStamper(),  # and the level, named as ours are (from the record's level)
            redact,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _format_exc_info,
            renderer,
        ],
    )
    handler = _BridgeHandler()
    handler.setFormatter(formatter)
    # On the handler too: a library line a filter lowers to DEBUG (arq's routine cron runs)
    # was already past the logger's level check.
    handler.setLevel(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BridgeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def use_json_lines(log_format: str) -> bool:
    """`json`, or `auto` when stderr is not a terminal."""
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Configure structlog, and the standard library's logging under it, once per process;
    safe to call again (tests do)."""
    use_json = use_json_lines(log_format)
    # JSON lines go out as bytes (structlog's documented fast path: BytesLogger + orjson).
    renderer: Any
    factory: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    level_number = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _UtcStamper(),  # and the level
            redact,
            _format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _forget_resolved_loggers()
    _bridge_stdlib(use_json, level_number)


def _forget_resolved_loggers() -> None:
    for logger in list(_loggers):
        logger._forget()


@contextlib.contextmanager
def captured() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog's `capture_logs()` (the lines as dicts, for tests), made to reach the module
    loggers too: they keep the methods of the configuration they first saw (see `_Logger`)."""
    _forget_resolved_loggers()
    try:
        with structlog.testing.capture_logs() as lines:
            yield lines
    finally:
        _forget_resolved_loggers()


def log_everything() -> None:
    """For the service's own processes (`serve`, `worker`, `run`, `sandbox`): Python warnings
    and uncaught exceptions become log lines too, so no line escapes the format. Not done by
    `configure_logging`, which tests call inside pytest (it owns those hooks there)."""
    logging.captureWarnings(True)
    crash_log = logging.getLogger("service.crash")

    def uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        crash_log.critical(
            "uncaught_exception",
            exc_info=(kind, value, tb),
            extra={RECORD_FIELDS: {"error": repr(value)}},  # even if the traceback cannot be
        )

    def uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
            crash_log.critical(
                "uncaught_exception",
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                extra={
                    RECORD_FIELDS: {
                        "thread": getattr(args.thread, "name", None),
                        "error": repr(args.exc_value),
                    }
                },
            )

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread


#: Every module-level logger, so `configure_logging` can make each re-resolve its methods.
_loggers: weakref.WeakSet[_Logger] = weakref.WeakSet()


class _Logger:
    """A module-level logger that resolves structlog's configuration once per configuration.

    structlog's lazy proxy (without `cache_logger_on_first_use`) rebuilds the bound logger on
    every call, which cost the worker about 0.15 ms per line; caching on first use would pin a
    logger to the first configuration, which tests (and a re-configured process) must not.
    Each method (`info`, `bind`, ...) is looked up once and kept on the instance, so a line
    costs no `__getattr__` call (1.5 µs); `configure_logging` forgets them all.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        _loggers.add(self)

    def __getattr__(self, attr: str) -> Any:  # only for names not yet kept on the instance
        if attr.startswith("__"):
            raise AttributeError(attr)
        method = getattr(structlog.get_logger(self._name).bind(), attr)
        setattr(self, attr, method)
        return method

    def _forget(self) -> None:
        name = self._name
        self.__dict__.clear()
        self._name = name


def get_logger(name: str) -> FilteringBoundLogger:
    """A module's logger. Typed as what it hands every call to (structlog's filtering bound
    logger), so mypy checks each log line; `_Logger` only caches the lookup."""
    return cast(FilteringBoundLogger, _Logger(name))
