"""What the command groups share: the service's Redis for an operator (never started by the
command), settings, options, and Ctrl-C between two units of work.

Light on purpose: `salla-rewards --help` and every refusal import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from service.settings import Settings, default_rules_path, load_settings

if TYPE_CHECKING:
    from arq.connections import ArqRedis
    from redis.asyncio import Redis

T = TypeVar("T")
Item = TypeVar("Item")

redis_option = click.option(
    "--redis-url",
    default=None,
    help="Redis of the service ($REDIS_URL; default: the embedded one on $EMBEDDED_REDIS_PORT).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
rules_path_option = click.option(
    "--rules",
    "rules_path",
    default=default_rules_path,
    show_default="rules",
    type=click.Path(path_type=Path),
    help="A rule file or folder ($RULES_PATH).",
)


def service_settings() -> Settings:
    """The service's settings for an operator command that needs all of them (`orders`)."""
    return load_settings()


def operator_settings() -> Settings:
    """Settings for operator commands: the service's environment, no webhook secret needed."""
    return load_settings(app_env="development")


def redis_url(settings: Settings, given: str | None = None) -> str:
    """The running service's Redis, which must answer: `--redis-url`, else `REDIS_URL`, else
    the embedded one's port. Operator commands never start a Redis of their own."""
    from service import preflight

    url = given or settings.redis_url or f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
    return preflight.redis_reachable(url, cluster=settings.redis_cluster)


def admin_url(given: str | None) -> str:
    """The service's Redis for operator commands (no webhook secret needed); fails clearly."""
    return redis_url(operator_settings(), given)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def _redis(url: str) -> AsyncIterator[Redis]:
    from service import state_store

    client = state_store.text_client(url, cluster=operator_settings().redis_cluster)
    try:
        yield client
    finally:
        await client.aclose()


def with_redis(url: str, work: Callable[[Redis], Awaitable[T]]) -> T:
    """Run `work(redis)` against the service's Redis (decoded strings)."""

    async def go() -> T:
        async with _redis(url) as client:
            return await work(client)

    return run_async(go())


def with_redis_and_queue(url: str, work: Callable[[Redis, ArqRedis], Awaitable[T]]) -> T:
    """Run `work(redis, pool)`: the service's Redis (decoded strings) and its job queue (on
    `QUEUE_REDIS_URL` / `QUEUE_REDIS_SENTINELS` when set, else the same Redis)."""
    from service import queue

    where = queue.target(operator_settings(), url)

    async def go() -> T:
        async with _redis(url) as client:
            pool = await queue.connect(where)
            try:
                return await work(client, pool)
            finally:
                await pool.aclose()

    return run_async(go())


@contextlib.contextmanager
def interruptible() -> Iterator[asyncio.Event]:
    """Ctrl-C (or SIGTERM) sets the event instead of raising: long commands stop between two
    units of work, never inside one. A second Ctrl-C interrupts at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_signal() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next Ctrl-C is a KeyboardInterrupt

    loop.add_signal_handler(signal.SIGINT, first_signal)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        yield stop
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)


async def step_by_step(
    items: Sequence[Item],
    label: str,
    work: Callable[[Iterable[Item], asyncio.Event], Awaitable[T]],
) -> T:
    """`work(items, stop)` with a progress bar that advances as `work` takes each item, and
    `stop` set by Ctrl-C (`interruptible`)."""
    with interruptible() as stop, click.progressbar(items, label=label) as bar:
        return await work(bar, stop)


def exit_if_interrupted(interrupted: bool, hint: str) -> None:
    """After a command that Ctrl-C stopped between two units of work: say how to finish, and
    exit 130 (as a shell reports an interrupted command)."""
    if interrupted:
        click.echo(f"interrupted: {hint}", err=True)
        sys.exit(130)
