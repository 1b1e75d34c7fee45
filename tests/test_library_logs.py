"""Libraries' log lines (uvicorn, arq) in our format; arq's job lines never carry a job's
arguments; routine cron runs stay out of an INFO log."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from redis.asyncio import Redis

from service import tokens
from service.logging import configure_logging, get_logger
from service.sandbox.app import Sandbox
from tests.conftest import (
    Service,
    authorize_data_first,
    eventually,
    make_settings,
    running_worker,
)

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


class TestLibraryLines:
    """A standard-library record is a line like ours: same fields, same formats. (A library
    of its own name here: in-process uvicorn servers of other tests set up uvicorn's loggers;
    `tests/test_cli.py` checks uvicorn's and arq's lines in a real `run`.)"""

    def test_same_level_timestamp_and_event_as_ours(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging("json", "INFO")
        logging.getLogger("a.library").info("Started server process [%d]", 42)
        get_logger("service.t").info("ours")
        theirs, ours = json_lines(capsys.readouterr().err)
        assert theirs["event"] == "Started server process [42]"
        assert theirs["logger"] == "a.library"
        assert theirs["level"] == ours["level"] == "info"
        assert TIMESTAMP.fullmatch(theirs["timestamp"]) and TIMESTAMP.fullmatch(ours["timestamp"])

    def test_an_exception_is_one_line_and_fields_are_redacted(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging("json", "INFO")
        try:
            raise ValueError("broken")
        except ValueError:
            logging.getLogger("asyncio").exception(
                "Task exception was never retrieved",
                extra={"log_fields": {"access_token": "AT-secret-1"}},
            )
        (line,) = json_lines(capsys.readouterr().err)
        assert line["level"] == "error"
        assert "ValueError: broken" in line["exception"]
        assert line["access_token"] == "[redacted]"

    def test_a_traceback_logged_after_its_except_block_is_kept(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """What the crash hook does: `sys.excepthook` runs once the `except` is gone, so the
        traceback exists only in the record's `exc_info` (a redaction that turned it into a
        list once dropped it, and a worker's crash said only its exception's repr)."""
        configure_logging("json", "INFO")
        try:
            raise TypeError("late")
        except TypeError as exc:
            caught = exc
        logging.getLogger("service.crash").critical(
            "uncaught_exception",
            exc_info=(type(caught), caught, caught.__traceback__),
            extra={"log_fields": {"error": repr(caught)}},
        )
        (line,) = json_lines(capsys.readouterr().err)
        assert "Traceback (most recent call last)" in line["exception"]
        assert "TypeError: late" in line["exception"]

    def test_the_configured_level_holds_for_libraries(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging("json", "WARNING")
        logging.getLogger("a.library").info("not shown")
        logging.getLogger("a.library").warning("shown")
        assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["shown"]


class TestArqJobLines:
    """arq's job lines through a real worker: named events, no job arguments."""

    async def test_an_authorize_logs_no_token(
        self,
        web: Service,
        redis: Redis,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        # `data` first in the body: arq's start line printed its first 80 characters, back when
        # an app event was an arq job; now it travels in its own stream, and the flush it asks
        # for is the job whose lines are checked.
        access_token = "AT-" + "q" * 40 + "-known"
        body = authorize_data_first(5150, access_token, "RT-known-refresh")
        settings = make_settings(sandbox[0], log_level="DEBUG")
        printed: list[str] = []

        def flush_finished() -> bool:
            printed.append(capsys.readouterr().err)
            return '"job_finished"' in "".join(printed) and "flush:5150:" in "".join(printed)

        async with running_worker(settings, redis_url):
            assert web.post_webhook(body).json()["status"] == "accepted"
            stored = await eventually(lambda: tokens.get(redis, 5150))
            assert stored.access_token == access_token
            await eventually(flush_finished)
        printed.append(capsys.readouterr().err)
        output = "".join(printed)
        assert "q" * 10 not in output and "RT-known" not in output
        # ...and the lines were there to check: the event's, and the job's from arq's logger.
        lines = json_lines(output)
        (processed,) = [line for line in lines if line["event"] == "event_processed"]
        assert processed["outcome"] == "tokens_stored" and processed["merchant"] == 5150
        mine = [line for line in lines if str(line.get("job_id", "")).startswith("flush:5150:")]
        assert [line["event"] for line in mine][:2] == ["job_started", "job_finished"]
        assert mine[0]["function"] == "flush" and mine[0]["logger"] == "arq.worker"

    async def test_routine_cron_runs_are_debug(
        self,
        redis: Redis,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
        capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="arq.worker")  # sees what our handler drops
        settings = make_settings(sandbox[0], log_level="INFO")

        def sweeps() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if getattr(r, "log_fields", {}).get("function") == "cron:sweep"
            ]

        async with running_worker(settings, redis_url):
            await eventually(lambda: any(r.msg == "job_finished" for r in sweeps()))
        assert {r.levelno for r in sweeps()} == {logging.DEBUG}
        lines = json_lines(capsys.readouterr().err)
        assert "worker_started" in {line["event"] for line in lines}  # captured, and quiet:
        assert not [line for line in lines if line.get("function") == "cron:sweep"]
