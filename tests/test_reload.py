"""Rules reload while the service runs; invalid rules never replace valid ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from service.logging import captured
from service.rules.reloader import RulesHolder
from service.webhooks import signed_headers
from tests.conftest import ROOT_DIR, SECRET, fixture_bytes
from tests.support.servers import free_port, wait_until

REVIEW = (
    "version: 1\nrules:\n  - {id: review, on: review.added, points: 50, type: plus, reason: r}\n"
)
SIGNUP = (
    "version: 1\nrules:\n  - {id: signup, on: customer.created, points: 9, type: plus, reason: s}\n"
)


class TestHolder:
    """`RulesHolder.reload()` swaps in valid rules and keeps the old ones otherwise."""

    def test_valid_change_is_taken(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(REVIEW)
        holder = RulesHolder(tmp_path)
        (tmp_path / "b.yaml").write_text(SIGNUP)
        assert holder.reload() is True
        assert {r.id for r in holder.current.rules} == {"review", "signup"}

    def test_invalid_change_keeps_the_old_rules_and_says_why(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(REVIEW)
        holder = RulesHolder(tmp_path)
        before = holder.current
        (tmp_path / "a.yaml").write_text(REVIEW.replace("points: 50", "points: order.status"))
        with captured() as lines:
            assert holder.reload() is False
        assert holder.current is before
        (line,) = lines
        assert line["event"] == "rules_reload_failed"
        assert "points must give a number" in line["problems"][0]


class TestSighup:
    """A running `serve` reloads its rules on SIGHUP."""

    def test_sighup_reloads_and_survives_a_bad_file(self, tmp_path: Path, redis_url: str) -> None:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "review.yaml").write_text(REVIEW)
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SALLA_WEBHOOK_SECRET": SECRET,
            "RULES_PATH": str(rules),
            "LOG_FORMAT": "json",
        }
        log_path = tmp_path / "serve.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(port)],
                cwd=ROOT_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}/webhooks/salla"
        body = fixture_bytes("customer.created.derived.json")
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200)
            assert _post(url, body)["status"] == "ignored"  # no rule uses customer.created yet
            (rules / "signup.yaml").write_text(SIGNUP)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: '"rules_reloaded"' in log_path.read_text())
            assert _post(url, body)["status"] == "accepted"
            (rules / "signup.yaml").write_text("version: 1\nrules: [")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: '"rules_reload_failed"' in log_path.read_text())
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["rules"] == 2
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _post(url: str, body: bytes) -> dict[str, str]:
    answer: dict[str, str] = httpx.post(
        url, content=body, headers=signed_headers(body, SECRET)
    ).json()
    return answer


class TestWatch:
    """In development a changed rule file is reloaded without a signal."""

    async def test_file_change_reloads(self, tmp_path: Path) -> None:
        import asyncio

        (tmp_path / "a.yaml").write_text(REVIEW)
        holder = RulesHolder(tmp_path)
        stop = asyncio.Event()
        task = asyncio.create_task(holder.watch(stop))
        try:
            await asyncio.sleep(0.3)  # let the watcher start
            (tmp_path / "b.yaml").write_text(SIGNUP)
            for _ in range(100):
                if holder.reloads:
                    break
                await asyncio.sleep(0.05)
            assert {r.id for r in holder.current.rules} == {"review", "signup"}
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=5)
