"""`WEBHOOK_DURABILITY`: a webhook's 200 means the delivery is in Redis's AOF on disk (`fsync`),
or also in a replica's (`replica`). Real valkey-server processes (a primary, a replica started
with `--replicaof`), real HTTP, real SIGKILL and SIGSTOP."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from service import preflight
from service.app import create_app
from service.embedded import EmbeddedRedis
from service.errors import ConfigError
from service.keys import APP_EVENTS_STREAM, WEBHOOK_STREAM
from service.logging import configure_logging
from service.settings import load_settings
from tests.conftest import (
    ROOT_DIR,
    SECRET,
    Service,
    authorize_data_first,
    fixture_json,
    make_settings,
)
from tests.support.processes import run_env
from tests.support.servers import free_port, serve_in_thread, wait_until
from tests.test_library_logs import json_lines

CLI = [sys.executable, "-m", "service"]
MERCHANT = 193718979  # the store of Salla's sample order
#: Short, so that a delivery Redis cannot confirm answers 503 quickly.
TIMEOUT_S = 0.5


def order_webhook(n: int) -> bytes:
    """Salla's sample order event for order `n`: a delivery of its own (the rules use it)."""
    doc = fixture_json("order.status.updated.json")
    doc["data"]["id"] = n
    doc["data"]["order"]["id"] = n
    return json.dumps(doc).encode()


def deliveries(client: Redis) -> list[bytes]:
    """The delivery ids in the inbox, in order (repeats kept: a repeat is a bug)."""
    return [fields[b"delivery"] for _, fields in client.xrange(WEBHOOK_STREAM)]


def delivered(web: Service, body: bytes) -> str:
    """Post `body` as Salla does: sent again after a non-2xx, until it gets a 200; its status.
    (A replica acknowledges what its AOF has on its own clock: now and then a write waits
    for its next once-a-second report, longer than this file's short timeout.)"""
    answers: list[httpx.Response] = []
    wait_until(lambda: answers.append(web.post_webhook(body)) or answers[-1].status_code == 200)
    return str(answers[-1].json()["status"])


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "primary", free_port())
    server.start()
    yield server
    server.stop()


def start_replica(folder: Path, port: int, primary: EmbeddedRedis) -> EmbeddedRedis:
    """A valkey-server replicating `primary`, with its own AOF (WAITAOF counts a replica once
    its AOF has the write); returns once it confirms a write. After a full sync a replica
    rewrites its AOF from what it loaded, and confirms nothing before that is done.

    `appendfsync always`: a replica fsyncs on its own clock (each second with `everysec`;
    only the primary hurries for a waiting WAITAOF), longer than this file's short timeout."""
    options = ("--replicaof", "127.0.0.1", str(primary.port), "--appendfsync", "always")
    replica = EmbeddedRedis(folder, port, extra_args=options)
    replica.start()
    with Redis.from_url(primary.url) as client:

        def confirmed() -> bool:
            client.set("probe", "1")
            return bool(client.waitaof(1, 1, 100) == [1, 1])

        wait_until(confirmed)
        client.delete("probe")
    return replica


@pytest.fixture
def replica(tmp_path: Path, primary: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    server = start_replica(tmp_path / "replica", free_port(), primary)
    yield server
    server.stop()


@contextlib.contextmanager
def web_on(redis_url: str, **settings: Any) -> Iterator[Service]:
    """The web app over real HTTP on `redis_url`, its durability wait short."""
    chosen = make_settings(webhook_durability_timeout_s=TIMEOUT_S, **settings)
    with serve_in_thread(create_app(chosen, redis_url)) as url:
        yield Service(url, chosen)


class TestFsync:
    """`fsync` (the default): 200 once the delivery is in the AOF on disk."""

    def test_an_acknowledged_webhook_survives_redis_being_killed(
        self, primary: EmbeddedRedis
    ) -> None:
        assert make_settings().webhook_durability == "fsync"  # the default
        with web_on(primary.url) as web:
            answers = [web.post_webhook(order_webhook(n)) for n in range(1, 21)]
            assert [a.json()["status"] for a in answers] == ["accepted"] * 20
            assert primary.process is not None
            primary.process.send_signal(signal.SIGKILL)  # no shutdown, no last write
            primary.process.wait()
        primary.process = None
        primary.start()  # the same data folder: Redis reads its AOF back
        with Redis.from_url(primary.url) as client:
            assert len(set(deliveries(client))) == len(deliveries(client)) == 20

    def test_a_redis_whose_aof_is_turned_off_answers_503_and_the_resend_lands_once(
        self, primary: EmbeddedRedis
    ) -> None:
        authorize = authorize_data_first(MERCHANT, "access-token", "refresh-token")
        with web_on(primary.url) as web, Redis.from_url(primary.url) as client:
            client.config_set("appendonly", "no")
            first = web.post_webhook(order_webhook(1))
            assert first.status_code == 503  # written in memory, not confirmed on disk
            assert first.json()["status"] == "error"
            # An app event (its own stream, the same connection) waits the same way.
            assert web.post_webhook(authorize).status_code == 503
            client.config_set("appendonly", "yes")  # Redis rewrites its AOF from memory
            wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
            again = web.post_webhook(order_webhook(1))  # Salla sends it again
            assert again.status_code == 200
            assert again.json()["status"] == "duplicate"
            assert len(deliveries(client)) == 1  # landed once: not lost, not doubled
            assert web.post_webhook(authorize).json()["status"] == "duplicate"  # written once
            assert client.xlen(APP_EVENTS_STREAM) == 1


class TestStartUpRefusal:
    """`fsync` and `replica` refuse to start against a Redis that cannot confirm a write."""

    @pytest.mark.parametrize(
        ("server_options", "error", "hint"),
        [
            (("--appendonly", "no"), "runs with appendonly no", "appendonly yes"),
            (("--rename-command", "WAITAOF", ""), "needs WAITAOF, which the Redis", "buffered"),
            (("--appendfsync", "no"), "did not confirm a write on disk", "appendfsync"),
        ],
        ids=["aof_off", "no_waitaof", "never_fsyncs"],
    )
    @pytest.mark.parametrize("mode", ["fsync", "replica"])
    def test_one_sentence_and_a_hint_exit_2(
        self, tmp_path: Path, mode: str, server_options: tuple[str, ...], error: str, hint: str
    ) -> None:
        server = EmbeddedRedis(tmp_path / "redis", free_port(), extra_args=server_options)
        server.start()
        try:
            env = run_env(
                tmp_path / "var",
                free_port(),
                SALLA_WEBHOOK_SECRET=SECRET,
                REDIS_URL=server.url,
                WEBHOOK_DURABILITY=mode,
            )
            result = subprocess.run(
                [*CLI, "serve", "--port", str(free_port())],
                cwd=ROOT_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            server.stop()
        assert result.returncode == 2
        (line,) = (result.stdout + result.stderr).splitlines()  # no traceback
        refusal = json.loads(line)
        assert refusal["error"].startswith(f"WEBHOOK_DURABILITY={mode}")
        assert error in refusal["error"]
        assert hint in refusal["hint"]

    def test_a_replica_that_never_confirms_is_named_at_start_up(
        self, tmp_path: Path, primary: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`replica` against a primary whose replica runs without AOF: every webhook would
        answer 503; start-up says why, in one line (a warning: a replica just synced confirms
        nothing until it rewrote its AOF, and that passes)."""
        configure_logging("json", "INFO")  # to the stderr `capsys` reads
        options = ("--replicaof", "127.0.0.1", str(primary.port), "--appendonly", "no")
        replica = EmbeddedRedis(tmp_path / "replica", free_port(), extra_args=options)
        replica.start()
        try:
            with Redis.from_url(primary.url) as client:
                wait_until(lambda: client.info("replication")["connected_slaves"] == 1)
            preflight.durable_writes(primary.url, "replica")
            preflight.durable_writes(primary.url, "fsync")  # a replica is not fsync's business
        finally:
            replica.stop()
        lines = json_lines(capsys.readouterr().err)
        (warned,) = [x for x in lines if x["event"] == "durability_replica_unconfirmed"]
        assert "appendonly" in warned["hint"] and warned["replicas"] == 1

    def test_a_mode_that_does_not_exist_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WEBHOOK_DURABILITY", "always")
        with pytest.raises(ConfigError) as refused:
            load_settings(app_env="development")
        assert "WEBHOOK_DURABILITY" in str(refused.value)
        assert "'buffered', 'fsync' or 'replica'" in str(refused.value)
        monkeypatch.setenv("WEBHOOK_DURABILITY", "Replica")  # any case, as LOG_FORMAT
        assert load_settings(app_env="development").webhook_durability == "replica"


class TestReplica:
    """`replica`: 200 once a replica's AOF has the delivery too; 503 while none confirms it."""

    def test_503_while_the_replica_is_down_and_nothing_lost_once_it_is_back(
        self, tmp_path: Path, primary: EmbeddedRedis, replica: EmbeddedRedis
    ) -> None:
        with (
            web_on(primary.url, webhook_durability="replica") as web,
            Redis.from_url(primary.url) as on_primary,
        ):
            # A first attempt that waited past the timeout answers 503 and its re-send
            # "duplicate" (Salla's way; the replica then has it): either is delivered.
            assert delivered(web, order_webhook(1)) in ("accepted", "duplicate")
            with Redis.from_url(replica.url) as on_replica:
                assert len(deliveries(on_replica)) == 1  # the replica had it before the 200
            replica.stop()
            down = web.post_webhook(order_webhook(2))
            assert down.status_code == 503
            back = start_replica(replica.data_dir, replica.port, primary)
            try:
                # Salla sends it again; the replica may need a moment to confirm what it read.
                assert delivered(web, order_webhook(2)) == "duplicate"
                with Redis.from_url(back.url) as on_replica:
                    assert len(deliveries(on_replica)) == 2
                assert len(deliveries(on_primary)) == 2  # order 2 once: not lost, not doubled
            finally:
                back.stop()

    def test_a_resend_on_another_connection_waits_for_the_first_attempt(
        self, primary: EmbeddedRedis, replica: EmbeddedRedis
    ) -> None:
        """The first attempt was written on the primary, not confirmed on the replica (paused):
        a re-send that reaches another web process finds it "seen", and must still not answer
        200 before the replica has the first attempt's write."""
        assert replica.process is not None
        with (
            web_on(primary.url, webhook_durability="replica") as web,
            web_on(primary.url, webhook_durability="replica") as other_web,
        ):
            # Both warmed up (a loaded machine's replica can answer the first attempt late:
            # 503, then "duplicate" for the re-send; either way it is on the replica).
            assert delivered(web, order_webhook(1)) in ("accepted", "duplicate")
            assert delivered(other_web, order_webhook(2)) in ("accepted", "duplicate")
            replica.process.send_signal(signal.SIGSTOP)  # connected, acknowledging nothing
            try:
                assert web.post_webhook(order_webhook(3)).status_code == 503
                assert other_web.post_webhook(order_webhook(3)).status_code == 503
            finally:
                replica.process.send_signal(signal.SIGCONT)
            assert delivered(other_web, order_webhook(3)) == "duplicate"
        with Redis.from_url(replica.url) as on_replica:
            assert len(deliveries(on_replica)) == 3
