"""What a worker process holds while it runs, in one typed object: made in arq's `on_startup`,
closed in `on_shutdown`, found by every job through `of(ctx)`.

arq hands jobs a plain dict (`ctx`); a typo in a string key there fails at run time, and every
job had to know which of several entries to take. One entry, typed, instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import httpx
from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import inbox, keys, state_store, sweeper
from service.batch import BatchHandler
from service.delivery.deps import Deps
from service.inbox import Inbox
from service.logging import get_logger
from service.orders import truth
from service.processing import ProcessingDeps
from service.rules.reloader import RulesHolder, live_rules
from service.salla import SallaClient
from service.settings import Settings

log = get_logger("service.worker")

#: The one entry of arq's `ctx` that the service uses.
CTX_KEY = "resources"


@dataclass
class WorkerResources:
    settings: Settings
    #: Replies as `str`: the ledger, tokens, settings.
    redis: Redis
    #: Replies as `bytes`: the inbox's webhook bodies.
    inbox_redis: Redis
    #: arq's pool on the queue's Redis (`QUEUE_REDIS_URL`): enqueueing jobs, nothing else.
    pool: ArqRedis
    http: httpx.AsyncClient
    rules: RulesHolder
    processing: ProcessingDeps
    #: The outgoing side: Salla calls, flushes, token refresh.
    delivery: Deps
    orders: truth.Deps
    #: One reader per inbox shard (`INBOX_SHARDS`), each with its task.
    inboxes: list[Inbox]
    inbox_tasks: list[asyncio.Task[None]]
    #: The app lifecycle events' stream: same reader and handler, nothing kept once processed.
    app_events: Inbox
    app_events_task: asyncio.Task[None]
    #: Sets this process's gauges from Redis every few seconds (`sweeper.keep_gauges_fresh`).
    gauges_task: asyncio.Task[None]
    _rules_watch: contextlib.AbstractAsyncContextManager[Any]

    @classmethod
    async def open(cls, settings: Settings, url: str, pool: ArqRedis) -> WorkerResources:
        redis = state_store.text_client(url, cluster=settings.redis_cluster)
        inbox_redis = state_store.bytes_client(url, cluster=settings.redis_cluster)
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(
                settings.salla_timeout_s, connect=min(5.0, settings.salla_timeout_s)
            ),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        )
        rules = RulesHolder(settings.rules_path)
        watch = live_rules(rules, watch=settings.is_development)
        await watch.__aenter__()
        processing = ProcessingDeps(settings, redis, pool, rules)
        handler = BatchHandler(processing)
        readers = [
            inbox.Inbox(
                inbox_redis,
                handler,
                stream=stream,
                keep_for_replay=settings.webhook_retention_days > 0,
                batch=settings.inbox_batch,
                claim_idle_s=settings.inbox_claim_after_s,
            )
            for stream in keys.webhook_streams(settings.inbox_shards)
        ]
        app_events = inbox.Inbox(
            inbox_redis,
            handler,
            stream=keys.APP_EVENTS_STREAM,
            keep_for_replay=False,  # tokens: gone once processed
            batch=settings.inbox_batch,
            claim_idle_s=settings.inbox_claim_after_s,
        )
        delivery = Deps(settings, redis, pool, SallaClient(http, settings.salla_api_base))
        return cls(
            settings=settings,
            redis=redis,
            inbox_redis=inbox_redis,
            pool=pool,
            http=http,
            rules=rules,
            processing=processing,
            delivery=delivery,
            orders=truth.Deps(processing, delivery),
            inboxes=readers,
            inbox_tasks=[
                asyncio.create_task(reader.run(), name=f"inbox-{n}")
                for n, reader in enumerate(readers)
            ],
            app_events=app_events,
            app_events_task=asyncio.create_task(app_events.run(), name="app-events"),
            gauges_task=asyncio.create_task(sweeper.keep_gauges_fresh(delivery), name="gauges"),
            _rules_watch=watch,
        )

    async def close(self) -> None:
        """The batches in progress finish and are acknowledged; then every client closes."""
        self.gauges_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.gauges_task
        for reader in (*self.inboxes, self.app_events):
            reader.stop()
        try:
            await asyncio.wait_for(
                asyncio.gather(*self.inbox_tasks, self.app_events_task),
                timeout=self.settings.job_timeout_s,
            )
        except TimeoutError:
            log.error("inbox_stop_timeout", why="the batch in progress is claimed again later")
        await self.inbox_redis.aclose()
        await self._rules_watch.__aexit__(None, None, None)
        await self.http.aclose()
        await self.delivery.replicated.aclose()
        await self.redis.aclose()


def of(ctx: dict[str, Any]) -> WorkerResources:
    """The worker's resources, from the `ctx` arq hands a job."""
    resources = ctx[CTX_KEY]
    assert isinstance(resources, WorkerResources)
    return resources
