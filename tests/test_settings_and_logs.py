"""Settings refuse what cannot work; logs never carry secrets."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from redis.asyncio import Redis

from service.embedded import EmbeddedRedis
from service.errors import ConfigError
from service.logging import configure_logging, get_logger
from service.settings import DEVELOPMENT_WEBHOOK_SECRET, ENV_FILE_VARIABLE, load_settings
from tests.support.servers import free_port, serve_in_thread


class TestSettings:
    def test_production_refuses_empty_secret(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("SALLA_WEBHOOK_SECRET", raising=False)
        with pytest.raises(ConfigError, match="SALLA_WEBHOOK_SECRET is empty or a placeholder"):
            load_settings(app_env="production")

    def test_development_uses_the_development_secret(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("SALLA_WEBHOOK_SECRET", raising=False)
        settings = load_settings(app_env="development")
        assert settings.webhook_secret == DEVELOPMENT_WEBHOOK_SECRET

    def test_environment_is_read_once_into_typed_fields(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SALLA_WEBHOOK_SECRET", "s3cret-value")
        monkeypatch.setenv("SALLA_WEBHOOK_STRATEGY", "token")
        monkeypatch.setenv("BATCH_WINDOW_S", "0.5")
        settings = load_settings()
        assert (settings.salla_webhook_strategy, settings.batch_window_s) == ("token", 0.5)
        assert "s3cret-value" not in repr(settings)

    def test_bad_values_are_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SALLA_WEBHOOK_STRATEGY", "md5")
        with pytest.raises(ConfigError, match="SALLA_WEBHOOK_STRATEGY"):
            load_settings(salla_webhook_secret="x-real-secret")

    @pytest.mark.parametrize(
        ("given", "level"), [("debug", "DEBUG"), ("Info", "INFO"), ("warn", "WARNING")]
    )
    def test_log_level_in_any_case(
        self, monkeypatch: pytest.MonkeyPatch, given: str, level: str
    ) -> None:
        """As uvicorn and most tools take it."""
        monkeypatch.setenv("LOG_LEVEL", given)
        monkeypatch.setenv("LOG_FORMAT", "JSON")
        settings = load_settings(salla_webhook_secret="x-real-secret")
        assert (settings.log_level, settings.log_format) == (level, "json")

    def test_a_refusal_is_one_sentence_and_a_hint(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LOG_LEVEL", "verbose")
        with pytest.raises(ConfigError) as refused:
            load_settings(salla_webhook_secret="x-real-secret")
        assert "\n" not in refused.value.message
        assert refused.value.message.startswith("invalid settings: LOG_LEVEL: ")
        assert ".env" in refused.value.hint


class TestDotenv:
    """`load_settings` reads `.env` in the working directory; the environment wins."""

    def test_read_when_present_and_the_environment_wins(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / ".env").write_text(
            "# a comment\nBATCH_WINDOW_S=7\nLOG_LEVEL=debug\nSALLA_WEBHOOK_SECRET=dotenv-secret\n"
            "NOT_A_SETTING=ignored\n"
        )
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv(ENV_FILE_VARIABLE)  # the suite turns .env off; a user has it on
        for name in ("BATCH_WINDOW_S", "SALLA_WEBHOOK_SECRET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LOG_LEVEL", "error")
        settings = load_settings()
        assert settings.batch_window_s == 7
        assert settings.webhook_secret == "dotenv-secret"
        assert settings.log_level == "ERROR"  # the environment's, not the file's

    def test_the_suite_reads_none(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Tests run from the checkout's root, where a developer may keep a `.env`."""
        (tmp_path / ".env").write_text("BATCH_WINDOW_S=7\n")
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("BATCH_WINDOW_S", raising=False)
        assert load_settings(salla_webhook_secret="x-real-secret").batch_window_s == 2.0


class TestRedaction:
    """Tokens, secrets and phone numbers never reach a log line, however nested."""

    def test_secrets_are_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging("json", "DEBUG")
        get_logger("t").info(
            "token_refreshed",
            access_token="AT-123",
            refresh_token="RT-456",
            headers={"Authorization": "Bearer AT-123"},
            customer={"mobile": "+966500000000", "name": "Ali"},
            secret="s3cret",
        )
        line = capsys.readouterr().err.strip().splitlines()[-1]
        for leaked in ("AT-123", "RT-456", "+966500000000", "s3cret"):
            assert leaked not in line
        doc = json.loads(line)
        assert doc["customer"]["name"] == "Ali" and doc["event"] == "token_refreshed"

    def test_a_flat_line_with_one_secret_field_is_masked(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Lines of plain fields take a shortcut; a secret-named one among them still counts."""
        configure_logging("json", "INFO")
        get_logger("t").info("x", merchant=1, status=200, webhook_secret="s3cret", ok=True)
        doc = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert doc["webhook_secret"] == "[redacted]"
        assert (doc["merchant"], doc["status"], doc["ok"]) == (1, 200, True)

    def test_a_secret_name_stays_masked_once_its_name_is_known(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Field names are remembered after the first line; a secret's name is remembered as
        a secret, so the second line takes no shortcut either."""
        configure_logging("json", "INFO")
        for _ in range(3):
            get_logger("t").info("y", merchant=1, partner_api_key="k-999")
        lines = capsys.readouterr().err.strip().splitlines()[-3:]
        assert [json.loads(x)["partner_api_key"] for x in lines] == ["[redacted]"] * 3


class TestReconfiguration:
    def test_a_long_lived_logger_follows_each_new_configuration(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Module loggers keep their methods between lines; a new configuration (level, and
        here a new stderr from capsys) replaces them."""
        log = get_logger("long-lived")
        configure_logging("json", "INFO")
        log.debug("hidden")
        log.info("shown", n=1)
        configure_logging("json", "DEBUG")
        log.debug("now-shown")
        events = [json.loads(x)["event"] for x in capsys.readouterr().err.strip().splitlines()]
        assert events == ["shown", "now-shown"]


class TestLineShape:
    def test_level_names_and_exceptions(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`level` as structlog's add_log_level names it; an exception's traceback rendered."""
        configure_logging("json", "DEBUG")
        log = get_logger("t")
        log.debug("a")
        log.warning("b")
        try:
            raise ValueError("boom-42")
        except ValueError:
            log.exception("c")
        log.error("d", exc_info=False)
        docs = [json.loads(x) for x in capsys.readouterr().err.strip().splitlines()[-4:]]
        assert [d["level"] for d in docs] == ["debug", "warning", "error", "error"]
        assert "ValueError: boom-42" in docs[2]["exception"]
        assert "exception" not in docs[0] and "exception" not in docs[3]
        assert all("exc_info" not in d for d in docs)


class TestTimestamps:
    def test_iso_utc_with_microseconds_as_structlog_writes_them(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging("json", "INFO")
        before = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=1)  # clock rounding
        for n in range(3):
            get_logger("t").info("tick", n=n)
        after = dt.datetime.now(dt.UTC)
        stamps = [json.loads(x)["timestamp"] for x in capsys.readouterr().err.splitlines()[-3:]]
        for stamp in stamps:
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
            assert before <= dt.datetime.fromisoformat(stamp) <= after
        assert stamps == sorted(stamps)


class TestReadiness:
    """/readyz fails when Redis goes away after start."""

    async def test_readyz_503_without_redis(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        import httpx

        from service.app import create_app
        from tests.conftest import make_settings

        server = EmbeddedRedis(tmp_path, free_port())
        url = server.start()
        try:
            with serve_in_thread(create_app(make_settings(), url)) as web_url:
                assert httpx.get(f"{web_url}/readyz").status_code == 200
                client = Redis.from_url(url)
                await client.shutdown(nosave=True)
                await client.aclose()
                response = httpx.get(f"{web_url}/readyz")
                assert response.status_code == 503
                assert response.json()["redis"] == "unreachable"
        finally:
            server.stop()


class TestSettingsAreDocumented:
    """Every setting appears in README.md and .env.example under its environment name."""

    def test_each_field_is_documented(self) -> None:
        from pathlib import Path

        from service.settings import Settings

        root = Path(__file__).parent.parent
        readme = (root / "README.md").read_text()
        example = (root / ".env.example").read_text()
        for name in Settings.model_fields:
            env_name = name.upper()
            assert env_name in readme, f"{env_name} missing from README.md"
            assert f"{env_name}=" in example, f"{env_name} missing from .env.example"


class TestLogEventsAreDocumented:
    """Every log event name the code emits is explained in docs/logging.md."""

    def test_each_event_name_is_in_the_docs(self) -> None:
        import re
        from pathlib import Path

        root = Path(__file__).parent.parent
        doc = (root / "docs" / "logging.md").read_text()
        names: set[str] = set()
        pattern = re.compile(r"\.(?:info|warning|error|exception|critical)\(\s*\"([a-z_]+)\"")
        # `run`'s lines (`_say("info", "run_ready", ...)`), and arq's job lines as renamed.
        said = re.compile(r"_say\(\s*\"[a-z]+\",\s*\"([a-z_]+)\"")
        renamed = re.compile(r"(?:return |_timed\()\"([a-z_]+)\"")
        for path in (root / "service").rglob("*.py"):
            text = path.read_text()
            names |= set(pattern.findall(text)) | set(said.findall(text))
            if path.name == "arq_log.py":
                names |= set(renamed.findall(text))
        assert len(names) > 20
        missing = sorted(n for n in names if f"`{n}`" not in doc)
        assert not missing, f"undocumented log events: {missing}"
