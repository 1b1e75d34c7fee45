"""The command line as a user runs it: real processes, real HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.webhooks import signed_headers
from tests.conftest import FIXTURES, SECRET, Service, authorize_data_first
from tests.support.processes import run_session, wait_session_empty
from tests.support.servers import free_port, wait_until

CLI = [sys.executable, "-m", "service"]
ROOT = Path(__file__).parent.parent
#: structlog's ISO 8601 in UTC, as our own lines write it.
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


class TestSend:
    """`send` signs a file exactly as Salla does."""

    def test_signature_strategy(self, web: Service) -> None:
        result = cli(
            "send",
            str(FIXTURES / "order.status.updated.json"),
            "--url",
            f"{web.url}/webhooks/salla",
            "--secret",
            SECRET,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('200 {"status":"accepted"')

    def test_wrong_secret_fails_with_the_answer(self, web: Service) -> None:
        result = cli(
            "send",
            str(FIXTURES / "order.status.updated.json"),
            "--url",
            f"{web.url}/webhooks/salla",
            "--secret",
            "wrong",
        )
        assert result.returncode == 1
        assert result.stdout.startswith("401 ") and "signature does not match" in result.stdout

    def test_merchant_override_is_signed_too(self, web: Service) -> None:
        url = f"{web.url}/webhooks/salla"
        result = cli(
            "send",
            str(FIXTURES / "review.added.json"),
            "--url",
            url,
            "--secret",
            SECRET,
            "--merchant",
            "42",
        )
        assert result.returncode == 0 and "accepted" in result.stdout


class TestRefusesToStart:
    """Bad configuration stops the service with a sentence, before it listens."""

    @pytest.mark.parametrize("secret", ["", "changeme"])
    def test_placeholder_secret_outside_development(self, secret: str) -> None:
        result = cli(
            "serve",
            "--port",
            str(free_port()),
            env={"APP_ENV": "production", "SALLA_WEBHOOK_SECRET": secret},
        )
        assert result.returncode != 0
        assert "SALLA_WEBHOOK_SECRET is empty or a placeholder" in result.stderr

    def test_invalid_rules(self, tmp_path: Path, redis_url: str) -> None:
        (tmp_path / "bad.yaml").write_text("version: 1\nrules:\n  - id: a\n    on: order.nope\n")
        result = cli(
            "serve",
            "--port",
            str(free_port()),
            env={
                "SALLA_WEBHOOK_SECRET": SECRET,
                "RULES_PATH": str(tmp_path),
                "REDIS_URL": redis_url,
            },
        )
        assert result.returncode != 0
        assert "rules are invalid" in result.stderr
        assert re.search(r"bad\.yaml:3: rule is missing required key 'points'", result.stderr)


class TestRun:
    """`salla-rewards run`: one command, and a sample order ends as points in the sandbox;
    with `LOG_FORMAT=json` every line it prints is a JSON object and none holds a secret."""

    pytestmark = pytest.mark.timeout(240)

    def test_sample_order_becomes_points_in_json_lines_only(self, tmp_path: Path) -> None:
        # `debug` in lower case, as uvicorn takes it: every process starts with it, and the
        # libraries' debug lines must be JSON too.
        with run_session(tmp_path, CLI, ROOT, BATCH_WINDOW_S="0.2", LOG_LEVEL="debug") as session:
            session.wait_ready()
            credentials = session.credentials()
            result = cli(
                "send", "examples/webhooks/order.status.updated.json", "--url", session.webhook_url
            )
            assert result.stdout.startswith("200 "), result
            # A store whose token arq would have printed: `data` first in the job's body.
            known_token = "AT-" + "z" * 40 + "-known-access-token"
            authorize = authorize_data_first(77001, known_token, "RT-known-refresh")
            answer = httpx.post(
                session.webhook_url,
                content=authorize,
                headers=signed_headers(authorize, credentials["webhook_secret"]),
            )
            assert answer.json()["status"] == "accepted"

            def credited() -> bool:
                answer = httpx.get(
                    f"{session.sandbox_url}/customers/loyalty/points",
                    params={"customer_id": 1779795066},
                    headers={"Authorization": f"Bearer {credentials['access_token']}"},
                ).json()
                return bool(answer["data"]) and answer["data"][0]["points"] == 15

            wait_until(credited, 30)
            wait_until(lambda: '"batch_sent"' in session.output(), 10)
            wait_until(lambda: '"merchant":77001' in session.output(), 10)
            session.proc.terminate()  # SIGTERM, as a process manager stops it
            assert session.proc.wait(timeout=60) == 0
            assert wait_session_empty(session.proc.pid) == []  # Redis and every child stopped

        lines = session.output().splitlines()
        story = [json.loads(line) for line in lines]  # every line, stdout and stderr: JSON
        assert all(isinstance(line, dict) for line in story)
        for line in story:
            assert {"event", "level", "timestamp"} <= line.keys(), line
            assert TIMESTAMP.fullmatch(line["timestamp"]), line
        loggers = {line.get("logger") for line in story}
        assert {"uvicorn.error", "arq.worker"} <= loggers  # libraries' lines, in our format
        events = {line["event"] for line in story}
        for step in ("run_ready", "webhook_received", "event_processed", "batch_sent"):
            assert step in events, step
        # No secret anywhere: the banner says where they are instead.
        text = "\n".join(lines)
        for secret in (
            credentials["access_token"],
            credentials["admin_token"],
            credentials["webhook_secret"],
            known_token[:12],
            "z" * 12,
            "RT-known-refresh",
        ):
            assert secret not in text, secret
        (banner,) = [line for line in story if line["event"] == "run_ready"]
        assert banner["credentials_file"] == str(session.data_dir / "run.json")
        # arq's job lines are named events without arguments; routine cron runs are DEBUG.
        jobs = [line for line in story if line["event"] == "job_started"]
        assert any(j["function"] == "flush" and j["job_id"].startswith("flush:") for j in jobs)
        # App events are no arq jobs: their own stream (their tokens never reach arq's lines).
        assert not [j for j in jobs if j.get("job_id", "").startswith("evt:")]
        assert any(
            line["event"] == "event_processed" and line.get("salla_event") == "app.store.authorize"
            for line in story
        )
        sweeps = [j for j in jobs if j["function"] == "cron:sweep"]
        assert sweeps and all(j["level"] == "debug" for j in sweeps)
        # The embedded Redis wrote its own output to its file, not into this stream (at
        # `--loglevel warning`, valkey-server logs its stop, not its start).
        assert "ready to exit" not in text
        redis_log = (session.data_dir / "redis" / "redis-server.log").read_text()
        assert "ready to exit" in redis_log
        order = [
            line
            for line in story
            if line["event"] == "event_processed" and line["salla_event"].startswith("order.")
        ]
        (order_line,) = order
        # One line says why: each rule's verdict, and the grant it queued.
        verdicts = {rule["rule_id"]: rule["verdict"] for rule in order_line["rules"]}
        assert verdicts["purchase"] == "grant"
        (grant,) = order_line["queued"]
        assert (grant["rule_id"], grant["points"]) == ("purchase", 15)
        (sent,) = [line for line in story if line["event"] == "batch_sent"]
        assert sent["status"] == 201 and sent["grant_ids"] == [grant["grant_id"]]
        # Redis 7's (and Valkey's) multi-part AOF: a folder with its manifest.
        assert (session.data_dir / "redis" / "appendonlydir" / "appendonly.aof.manifest").exists()
        assert not (session.data_dir / "run.json").exists()  # the tokens died with the sandbox


class TestRulesCommands:
    """`rules check | simulate | test` work without Redis or Salla."""

    def test_check_passes_on_the_examples(self) -> None:
        result = cli("rules", "check")
        assert result.returncode == 0, result.stderr
        written = sum(
            len(re.findall(r"^ *- name:", path.read_text(), re.M))
            for path in (ROOT / "rules").rglob("*.yaml")
        )
        assert result.stdout.startswith("ok: ") and f"{written} tests" in result.stdout

    def test_check_names_file_and_line(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            "version: 1\nrules:\n  - {id: a, on: order.nope, points: 1, type: plus, reason: r}\n"
        )
        result = cli("rules", "check", str(bad))
        assert result.returncode == 1
        assert f"{bad}:3: unknown Salla event 'order.nope'" in result.stderr

    def test_simulate_shows_grants_and_why(self) -> None:
        result = cli("rules", "simulate", "examples/webhooks/order.status.updated.json")
        assert result.returncode == 0, result.stderr
        assert "purchase" in result.stdout and "rounded (floor) to 15" in result.stdout
        assert "grant: plus 15 (purchase)" in result.stdout

    def test_simulate_json_with_store_settings(self, tmp_path: Path) -> None:
        settings_file = tmp_path / "settings.json"
        settings_file.write_text('{"sar_per_point": 5, "vip_group": "not a number"}')
        result = cli(
            "rules",
            "simulate",
            "examples/webhooks/order.status.updated.json",
            "--settings",
            str(settings_file),
            "--json",
        )
        doc = __import__("json").loads(result.stdout)
        assert doc["grants"] == [{"rule": "purchase", "points": 30, "type": "plus"}]
        assert doc["problems"] == ["setting 'vip_group': 'not a number' is not a Decimal"]

    def test_rule_tests_fail_when_expectations_are_wrong(self, tmp_path: Path) -> None:
        (tmp_path / "r.yaml").write_text(
            "version: 1\nrules:\n  - {id: r, on: review.added, points: 50, type: plus, reason: x}\n"
            "tests:\n  - name: wrong\n    event: "
            f"{ROOT / 'examples/webhooks/review.added.json'}\n"
            "    expect: [{rule: r, points: 51}]\n"
        )
        result = cli("rules", "test", str(tmp_path))
        assert result.returncode == 1
        assert "FAIL wrong" in result.stdout
        assert "expected grants [('r', 51, 'plus')], got [('r', 50, 'plus')]" in result.stdout
        assert "0 passed, 1 failed" in result.stdout

    def test_a_copied_rule_file_checks_and_its_tests_name_the_missing_event(
        self, tmp_path: Path
    ) -> None:
        """A user copies purchase.yaml as a template: it loads (serving never reads the test
        events); `rules test` says which event file is missing and where it looked."""
        (tmp_path / "purchase.yaml").write_bytes((ROOT / "rules/purchase.yaml").read_bytes())
        check = cli("rules", "check", str(tmp_path))
        assert check.returncode == 0, check.stderr
        assert "ok: 1 rules in 1 files" in check.stdout
        result = cli("rules", "test", str(tmp_path))
        assert result.returncode == 1
        missing = tmp_path / "../examples/webhooks/order.status.updated.json"
        assert (
            f"the event file {missing} does not exist (a test's event path is relative to its "
            "rule file)"
        ) in result.stdout
        assert "PASS the VIP group earns double" in result.stdout  # inline events still run
        text = (ROOT / "rules/purchase.yaml").read_text()
        from_files = len(re.findall(r"^ *event: \.\./", text, re.M))
        inline = len(re.findall(r"^ *- name:", text, re.M)) - from_files
        assert f"{inline} passed, {from_files} failed" in result.stdout

    def test_rule_test_events_resolve_against_the_rule_file(self, tmp_path: Path) -> None:
        """`event: ../examples/...` is relative to the rule file, wherever the command runs."""
        (tmp_path / "rules").mkdir()
        (tmp_path / "examples").mkdir()
        (tmp_path / "examples/review.json").write_bytes(
            (ROOT / "examples/webhooks/review.added.json").read_bytes()
        )
        (tmp_path / "rules/r.yaml").write_text(
            "version: 1\nrules:\n  - {id: r, on: review.added, points: 50, type: plus, reason: x}\n"
            "tests:\n  - name: relative\n    event: ../examples/review.json\n"
            "    expect: [{rule: r, points: 50}]\n"
        )
        result = cli("rules", "test", str(tmp_path / "rules"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "PASS relative" in result.stdout and "1 passed, 0 failed" in result.stdout

    def test_serve_starts_with_a_copied_rule_file(self, tmp_path: Path, redis_url: str) -> None:
        """The rule file's test events are absent; `serve` loads the rules all the same."""
        (tmp_path / "purchase.yaml").write_bytes((ROOT / "rules/purchase.yaml").read_bytes())
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SALLA_WEBHOOK_SECRET": SECRET,
            "RULES_PATH": str(tmp_path),
            "LOG_FORMAT": "json",
        }
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*CLI, "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=out, stderr=out
            )
        try:
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or httpx.get(f"http://127.0.0.1:{port}/readyz").is_success
                )
            )
            assert proc.poll() is None, log.read_text()
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["rules"] == 1
        finally:
            proc.terminate()
            proc.wait(timeout=20)
