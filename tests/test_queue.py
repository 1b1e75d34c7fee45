"""The queue and the service's Redis: jobs are data, never code; password and TLS reach every
client; a worker rides out a Redis outage. Real redis-server processes and real subprocesses.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
from redis import Redis
from redis.exceptions import RedisError

from service import queue, redis_url
from service.embedded import server_args
from service.errors import ConfigError, JobRefused
from service.sandbox.app import Sandbox
from tests.conftest import ROOT_DIR, SECRET, Service, fixture_bytes, make_settings
from tests.support.servers import free_port, wait_until
from tests.support.store import ORDER_CUSTOMER, ORDER_MERCHANT, authorize_body
from tests.support.tls_proxy import TlsProxy

CLI = [sys.executable, "-m", "service"]
#: URL-special characters on purpose: the URL carries it percent-encoded.
PASSWORD = "p@ss:w/rd%-of-the-test"


class _Touch:
    """Unpickling this creates a file: proof, without harm, that a pickle was run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


def pickled_job(marker: Path) -> bytes:
    """A job in arq's default (pickle) format whose loading runs `Path(marker).touch()`."""
    job = {"t": 1, "f": queue.FLUSH, "a": (_Touch(marker),), "k": {}, "et": 0}
    return pickle.dumps(job)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            lines.append(doc)
    return lines


class TestJobFormat:
    """Jobs travel as msgpack: plain values in, plain values out, anything else refused."""

    def test_a_job_with_a_bytes_body_round_trips(self) -> None:
        job = {"t": None, "f": "process_event", "a": (b'{"x": 1}', "d", "t"), "k": {}, "et": 5}
        decoded = queue.decode_job(queue.encode_job(job))
        assert decoded == {**job, "a": [b'{"x": 1}', "d", "t"]}

    def test_a_pickle_is_refused_and_never_loaded(self, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        with pytest.raises(JobRefused, match="a pickle"):
            queue.decode_job(pickled_job(marker))
        assert not marker.exists()
        pickle.loads(pickled_job(marker))  # noqa: S301 - proof the payload is real: loading runs it
        assert marker.exists()

    def test_msgpack_that_is_not_a_job_is_refused(self) -> None:
        with pytest.raises(JobRefused, match="not a job"):
            queue.decode_job(msgspec.msgpack.encode([1, 2]))

    def test_arguments_that_are_not_plain_values_fail_the_enqueue(self) -> None:
        with pytest.raises(TypeError, match="cannot carry"):
            queue.encode_job({"f": "flush", "a": (object(),)})

    def test_a_failed_job_records_its_exception_as_text(self) -> None:
        result = queue.decode_job(queue.encode_job({"r": ValueError("boom")}))
        assert result == {"r": "ValueError('boom')"}


class TestRedisUrl:
    """REDIS_URL is read the same way by redis-py and arq; its password never printed."""

    def test_tls_checks_the_host_name_unless_told_not_to(self) -> None:
        url = redis_url.check("rediss://:pw@redis.example:6380/0?ssl_ca_certs=/ca.pem")
        assert "ssl_check_hostname=true" in url
        kept = redis_url.check("rediss://h:6380/0?ssl_check_hostname=false")
        assert kept.endswith("ssl_check_hostname=false")
        assert redis_url.check("redis://h:6379/0") == "redis://h:6379/0"

    def test_arq_gets_what_redis_py_gets(self) -> None:
        url = redis_url.check(
            f"rediss://:{quote(PASSWORD, safe='')}@redis.example:6380/2?ssl_ca_certs=/ca.pem"
        )
        settings = redis_url.arq_settings(url)
        assert (settings.host, settings.port, settings.database) == ("redis.example", 6380, 2)
        assert settings.password == PASSWORD  # percent-decoded, as redis-py sends it
        assert settings.ssl and settings.ssl_ca_certs == "/ca.pem"
        assert settings.ssl_check_hostname is True

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("http://h:6379", "must start with redis://"),
            ("redis://h:6379/0?socket_keepalive=true", "unsupported parameter socket_keepalive"),
            ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "only for a rediss:// (TLS) URL"),
            ("redis://h:notaport/0", "Port"),
        ],
    )
    def test_mistakes_get_one_sentence(self, url: str, message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            redis_url.check(url)

    def test_the_password_is_masked(self) -> None:
        assert redis_url.redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
        assert redis_url.redact("redis://h:6379/0") == "redis://h:6379/0"

    def test_a_placeholder_password_refuses_to_start_outside_development(self) -> None:
        with pytest.raises(ValueError, match="REDIS_URL's password is a placeholder"):
            make_settings(redis_url="redis://:<redis password>@redis:6379/0")
        assert make_settings(redis_url="redis://:real-one@redis:6379/0").redis_url


def run_worker_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [*CLI, "worker"], cwd=ROOT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
class TestNothingFromRedisRuns:
    """A pickle written into arq's queue is refused by a real worker, and nothing runs."""

    def test_a_pickled_job_is_refused_with_a_clear_line(
        self, redis_url: str, tmp_path: Path, sandbox: tuple[str, Sandbox]
    ) -> None:
        client = Redis.from_url(redis_url)
        client.flushall()
        marker = tmp_path / "pwned"
        client.set("arq:job:evil", pickled_job(marker))
        client.zadd("arq:queue", {"evil": time.time() * 1000})
        env = {
            **os.environ, "REDIS_URL": redis_url, "SALLA_WEBHOOK_SECRET": SECRET,
            "SALLA_API_BASE": sandbox[0], "LOG_FORMAT": "json", "WORKER_METRICS_PORT": "0",
        }  # fmt: skip
        log = tmp_path / "worker.log"
        worker = run_worker_process(env, log)
        try:
            wait_until(lambda: client.zscore("arq:queue", "evil") is None, timeout_s=30)
            wait_until(lambda: "job_refused" in log.read_text(), timeout_s=10)
        finally:
            stop(worker)
            client.close()
        assert not marker.exists(), "the worker unpickled a job from Redis"
        text = log.read_text()
        [refused] = [line for line in json_lines(text) if line.get("event") == "job_refused"]
        assert refused["level"] == "error"
        assert "a pickle" in refused["why"] and "not run" in refused["why"]
        assert "deserializing job evil failed" in text  # arq's own line names the job
        assert worker.returncode == 0  # it went on working, and stopped cleanly on SIGTERM


@dataclass
class GuardedRedis:
    """A redis-server that wants a password (`requirepass`)."""

    port: int
    process: subprocess.Popen[bytes]

    def url(self, password: str = PASSWORD) -> str:
        return f"redis://:{quote(password, safe='')}@127.0.0.1:{self.port}/0"

    def client(self) -> Redis:
        return Redis(port=self.port, password=PASSWORD)

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except RedisError:
            return False


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedRedis]:
    port = free_port()
    folder = tmp_path_factory.mktemp("guarded")
    argv = [*server_args(folder, port), "--requirepass", PASSWORD]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    server = GuardedRedis(port, process)
    try:
        wait_until(server.answers, timeout_s=10)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="module")
def tls(guarded: GuardedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsProxy]:
    with TlsProxy(guarded.port, tmp_path_factory.mktemp("tls")) as proxy:
        yield proxy


def service_url(kind: str, guarded: GuardedRedis, tls: TlsProxy) -> str:
    if kind == "password":
        return guarded.url()
    return (
        f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{tls.port}/0"
        f"?ssl_ca_certs={quote(str(tls.ca_file))}"
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=40
    )


@pytest.mark.slow
@pytest.mark.timeout(240)  # a dozen CLI processes, each a few seconds on a loaded machine
@pytest.mark.parametrize("kind", ["password", "tls"])
class TestPasswordAndTls:
    """`serve`, `worker`, `worker --check` and every CLI verb work with a password, and over
    TLS (a `rediss://` URL whose CA is given as `ssl_ca_certs`)."""

    def test_serve_and_worker_credit_an_order(
        self,
        kind: str,
        guarded: GuardedRedis,
        tls: TlsProxy,
        sandbox: tuple[str, Sandbox],
        tmp_path: Path,
    ) -> None:
        guarded.client().flushall()
        handshakes = tls.connections
        url, box = sandbox
        port = free_port()
        env = {
            **os.environ, "REDIS_URL": service_url(kind, guarded, tls),
            "SALLA_WEBHOOK_SECRET": SECRET, "SALLA_API_BASE": url,
            "SALLA_OAUTH_TOKEN_URL": f"{url}/oauth2/token", "LOG_FORMAT": "json",
            "BATCH_WINDOW_S": "0.1", "WORKER_METRICS_PORT": "0", "WORKER_HEALTH_INTERVAL_S": "1",
        }  # fmt: skip
        with (tmp_path / "web.log").open("wb") as out:
            web = subprocess.Popen(
                [*CLI, "serve", "--port", str(port)],
                cwd=ROOT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        worker = run_worker_process(env, tmp_path / "worker.log")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout_s=30)
            service = Service(base, make_settings(url))
            store = box.add_store(ORDER_MERCHANT)
            assert service.post_webhook(authorize_body(ORDER_MERCHANT, store)).status_code == 200
            answer = service.post_webhook(fixture_bytes("order.status.updated.json"))
            assert answer.json()["status"] == "accepted"
            wait_until(lambda: store.balances.get(ORDER_CUSTOMER) == 15, timeout_s=30)
            check = cli(env, "worker", "--check")
            assert check.returncode == 0, check.stderr
        finally:
            stop(web, worker)
        if kind == "tls":
            assert tls.connections > handshakes  # every client above went through TLS
        assert PASSWORD not in (tmp_path / "web.log").read_text()
        assert PASSWORD not in (tmp_path / "worker.log").read_text()

    def test_a_wrong_password_is_one_line_without_the_password(
        self, kind: str, guarded: GuardedRedis, tls: TlsProxy
    ) -> None:
        wrong = service_url(kind, guarded, tls).replace(quote(PASSWORD, safe=""), "not-it-xyz")
        result = cli({**os.environ, "REDIS_URL": wrong}, "admin", "store", "7")
        assert result.returncode == 2  # a configuration mistake, as in serve, worker and run
        assert "cannot reach Redis at " in result.stderr and ":***@127.0.0.1" in result.stderr
        assert "not-it-xyz" not in result.stderr and "Traceback" not in result.stderr


def test_the_tls_server_certificate_is_verified(guarded: GuardedRedis, tls: TlsProxy) -> None:
    """`rediss://` checks the certificate: without the test CA, the handshake is refused."""
    url = service_url("tls", guarded, tls)
    with pytest.raises(RedisError, match="certificate verify failed"):
        Redis.from_url(redis_url.check(url.split("?")[0])).ping()  # the system's CAs only
    assert Redis.from_url(redis_url.check(url)).ping()


@pytest.mark.slow
@pytest.mark.timeout(240)  # a dozen CLI processes, each a few seconds on a loaded machine
class TestEveryCliVerb:
    """Every CLI verb over TLS with a password (the `rediss://` URL carries both): one run of a
    dozen CLI processes covers both settings; `TestPasswordAndTls` covers each on its own for
    serve, worker and `worker --check`."""

    def test_every_cli_verb(self, guarded: GuardedRedis, tls: TlsProxy, tmp_path: Path) -> None:
        guarded.client().flushall()
        env = {**os.environ, "REDIS_URL": service_url("tls", guarded, tls), "LOG_FORMAT": "json"}
        customers = tmp_path / "customers.csv"
        customers.write_text("501\n502\n")
        export = tmp_path / "export.jsonl"
        expected = {
            ("campaign", "--merchant", "7", "--points", "5", "--reason", "test",
             "--customers", str(customers)): "2 new grant(s) queued for store 7",
            ("grants", "failed"): "0 failed grant(s)",
            ("grants", "retry", "--merchant", "7"): "0 grant(s) queued again",
            ("admin", "store", "7"): "store 7:",
            ("admin", "customer", "7", "501"): "customer 501 of store 7: pending +5",
            ("admin", "export", "-o", str(export)): "2 grant(s) exported",
            ("admin", "replay"): "0 webhook(s) replayed",
        }  # fmt: skip
        for args, says in expected.items():
            result = cli(env, *args)
            assert result.returncode == 0, (args, result.stderr)
            assert says in result.stdout + result.stderr, (args, result.stdout, result.stderr)
        assert guarded.client().zcard("arq:queue") == 1  # the campaign's flush job, via arq
        order = cli(env, "admin", "order", "7", "1")  # reached Redis; the ledger has no order 1
        assert order.returncode == 1 and "nothing in the ledger" in order.stdout
        check = cli(env, "worker", "--check")  # reached Redis; no worker has reported in
        assert check.returncode == 1 and "no worker has reported in" in check.stderr


class TestFlushScheduling:
    async def test_a_failed_enqueue_is_asked_again(
        self, redis_url: str, tmp_path: pathlib.Path
    ) -> None:
        """The window's flush is remembered only once arq has it: an enqueue that failed (Redis
        went away) must not silence that window's flush until the sweep."""
        from service import process_state, queue
        from service.embedded import EmbeddedRedis
        from tests.support.servers import free_port

        process_state.reset()
        server = EmbeddedRedis(tmp_path, free_port())
        away = await queue.connect(server.start())
        server.stop()
        with pytest.raises(RedisError):
            await queue.enqueue_flush(away, 7, window_s=3600)
        await away.aclose()
        assert 7 not in process_state.last_flush
        pool = await queue.connect(redis_url)
        try:
            await pool.flushall()
            await queue.enqueue_flush(pool, 7, window_s=3600)
            assert [j.function for j in await pool.queued_jobs()] == [queue.FLUSH]
            assert process_state.last_flush[7].startswith("flush:7:")
        finally:
            await pool.flushall()
            await pool.aclose()
            process_state.reset()


class TestWaitingForRedis:
    """A worker that lost Redis resumes when Redis answers PING with PONG, not when anything
    answers on its port (another process took it, or a reconnecting client's socket connected
    to itself and read its own PING back)."""

    async def test_an_echo_on_the_port_is_not_redis_and_a_real_redis_is(
        self, tmp_path: Path
    ) -> None:
        import asyncio

        from arq.connections import ArqRedis

        from service.embedded import EmbeddedRedis
        from service.worker import wait_for_redis

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        port = free_port()
        impostor = await asyncio.start_server(echo, "127.0.0.1", port)
        pool = ArqRedis.from_url(f"redis://127.0.0.1:{port}")
        try:
            assert await pool.ping() is False  # it answered, with our own PING
            waiting = asyncio.create_task(wait_for_redis(pool))
            await asyncio.sleep(2.5)  # several tries
            assert not waiting.done()
            impostor.close()
            await impostor.wait_closed()
            await pool.connection_pool.disconnect()
            server = EmbeddedRedis(tmp_path, port)
            server.start()
            try:
                await asyncio.wait_for(waiting, timeout=30)
                assert await pool.ping() is True
            finally:
                server.stop()
        finally:
            await pool.aclose()
