"""`create_app(settings)`: the HTTP edge. Routes, lifespan (Redis pool, rules).

The request path is short and does no outbound I/O:
route → read body (limited) → verify → read the envelope → dedupe + persist (the inbox) → 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service import ingest, metrics, process_state, queue, state_store
from service.admin.http import AdminState
from service.admin.http import routes as admin_routes
from service.errors import PayloadTooLarge, RequestTimeout, ServiceError, WebhookError
from service.events import LIFECYCLE_EVENTS
from service.ids import parse_digits
from service.keys import APP_EVENTS_STREAM, webhook_streams
from service.logging import configure_logging, get_logger
from service.processing import ProcessingDeps
from service.rules import RuleSet
from service.rules.reloader import RulesHolder, live_rules
from service.settings import Settings
from service.webhooks import delivery_id, read_head, verify

log = get_logger("service.web")


@dataclass
class AppState:
    settings: Settings
    #: The state store (`REDIS_URL`): every webhook and app event is written here. The web
    #: needs no other Redis: only the admin routes (when on) hold a pool on arq's queue.
    redis: Redis
    holder: RulesHolder
    writer: ingest.EventWriter

    @property
    def rules(self) -> RuleSet:
        return self.holder.current


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.service
    return state


class _Disconnected(ServiceError):
    """The client went away before its body arrived: nothing to persist, nobody to answer."""


async def _read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float) -> bytes:
    declared = parse_digits(_header(scope, b"content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    # `asyncio.timeout`'s own mechanism (a timer that cancels the task, then `uncancel`), by
    # hand: the context manager cost ~10 µs per request, 3-4% of the webhook's CPU.
    task = asyncio.current_task()
    assert task is not None
    expired: list[bool] = []
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, task, expired)
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:  # our timer's cancellation, and no one else's
            raise RequestTimeout(f"the body did not arrive within {timeout_s:g}s") from None
        raise
    finally:
        timer.cancel()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:  # ASGI servers give header names in lower case
            return str(value.decode("latin-1"))
    return ""


def _answer(http_status: int, /, **body: object) -> JSONResponse:
    return JSONResponse(body, status_code=http_status)


_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _send_json(send: Send, http_status: int, body: dict[str, object]) -> None:
    """A JSON answer written straight to the ASGI server: the webhook's hot path."""
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": http_status,
            "headers": [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _count_webhook(event: str, outcome: str) -> None:
    """`WEBHOOKS{event, outcome}` += 1, with the labelled child looked up once per pair (the
    pairs are bounded: an event name Salla does not document counts as `other`)."""
    event = metrics.event_label(event)
    child = process_state.metric_children.get((event, outcome))
    if child is None:
        child = process_state.metric_children[(event, outcome)] = metrics.WEBHOOKS.labels(
            event, outcome
        )
    child.inc()


async def salla_webhook(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /webhooks/salla, as a plain ASGI endpoint: Salla's bursts meet the least framework
    work per request (no Request/Response objects). Unexpected errors still reach the app's
    500 handler; the route answers other methods 405."""
    state: AppState = scope["app"].state.service
    settings = state.settings
    started = time.perf_counter()
    trace_id = f"{random.getrandbits(64):016x}"  # follows the delivery; not a secret
    try:
        body = await _read_body(
            scope, receive, settings.max_body_bytes, settings.request_body_timeout_s
        )
        verify(Headers(scope=scope), body, settings.webhook_secret, settings.salla_webhook_strategy)
        env = read_head(body)
    except _Disconnected:
        return
    except WebhookError as exc:
        _count_webhook(metrics.UNREAD_EVENT, f"rejected_{exc.status_code}")
        log.warning(
            "webhook_rejected",
            trace_id=trace_id,
            status=exc.status_code,
            error=exc.message,
            duration_ms=_ms(started),
        )
        await _send_json(send, exc.status_code, {"status": "rejected", "error": exc.message})
        return
    # The fields every line about this delivery carries (a dict, not a bound logger: cheaper).
    who = {"trace_id": trace_id, "merchant": env.merchant, "salla_event": env.event}
    if env.event not in LIFECYCLE_EVENTS and not state.rules.uses(env.event):
        _count_webhook(env.event, "ignored")
        log.info("webhook_ignored", **who, status=200, duration_ms=_ms(started))
        await _send_json(send, 200, {"status": "ignored", "event": env.event})
        return
    delivery = delivery_id(env.merchant, env.event, body)
    try:
        # App events (few, and they carry tokens) have a stream of their own.
        write: Callable[..., Awaitable[Any]] = (
            state.writer.accept_app_event if env.event in LIFECYCLE_EVENTS else state.writer.accept
        )
        accepted = await write(
            merchant=env.merchant,
            event=env.event,
            delivery=delivery,
            body=body,
            trace_id=trace_id,
        )
    except RedisError as exc:
        # Not persisted: a non-2xx answer makes Salla deliver it again later.
        log.error(
            "webhook_not_persisted", **who, status=503, error=repr(exc), duration_ms=_ms(started)
        )
        await _send_json(
            send, 503, {"status": "error", "error": "could not persist the event; please retry"}
        )
        return
    outcome = "accepted" if accepted else "duplicate"
    _count_webhook(env.event, outcome)
    log.info(
        "webhook_received",
        **who,
        status=200,
        outcome=outcome,
        delivery=delivery,
        duration_ms=_ms(started),
    )
    await _send_json(send, 200, {"status": outcome, "trace_id": trace_id})


@dataclass(frozen=True)
class _AsgiEndpoint:
    """Starlette wraps plain functions in Request/Response; an object is routed as ASGI."""

    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> JSONResponse:
    return _answer(200, status="ok")


async def readyz(request: Request) -> JSONResponse:
    """Ready when the state store answers: webhooks need nothing else (the queue's Redis is
    the worker's business)."""
    state = _state(request)
    try:
        await state.redis.ping()
    except (RedisError, OSError) as exc:
        return _answer(503, status="unavailable", redis="unreachable", error=repr(exc))
    return _answer(200, status="ready", redis="ok", rules=len(state.rules.rules))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """404/405 and friends in the documented error shape, with a sentence."""
    if not isinstance(exc, HTTPException):  # Starlette only routes HTTPException here
        return await _unexpected_error(request, exc)
    where = f"{request.method} {_shown_path(request)}"
    error = {
        404: f"there is nothing at {where}",
        405: f"{where}: the method is not allowed here",
    }.get(exc.status_code, f"{where}: {exc.detail}")
    return _answer(exc.status_code, status="rejected", error=error)


def _shown_path(request: Request) -> str:
    path = request.url.path
    return path if len(path) <= 100 else path[:100] + "..."


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected_error", path=_shown_path(request))
    if request.url.path == "/webhooks/salla":  # Salla will send it again: say nothing was kept
        error = "internal error; the event was not accepted"
    else:
        error = "internal error; the service's log has the details (unexpected_error)"
    return _answer(500, status="error", error=error)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def openapi_document(*, with_admin: bool) -> dict[str, Any]:
    """The service's own OpenAPI description (service/openapi.yaml)."""
    text = resources.files("service").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    if not with_admin:
        doc["paths"] = {p: v for p, v in doc["paths"].items() if not p.startswith("/admin/")}
    return doc


def create_app(settings: Settings, redis_url: str, rules: RuleSet | None = None) -> Starlette:
    """The web application. Rules are loaded at start-up; invalid rules refuse to start."""
    holder = RulesHolder(settings.rules_path, rules)
    admin_token = settings.admin_token.get_secret_value()
    description = openapi_document(with_admin=bool(admin_token))

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(description)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        state_redis = state_store.bytes_client(redis_url, cluster=settings.redis_cluster)
        # Every group before the first webhook is accepted: the workers read from here.
        for stream in (*webhook_streams(settings.inbox_shards), APP_EVENTS_STREAM):
            await ingest.ensure_group(state_redis, stream)
        writer = ingest.EventWriter(
            state_redis,
            seen_ttl_s=settings.dedupe_ttl_s,
            retention_days=settings.webhook_retention_days,
            durability=settings.webhook_durability,
            durability_timeout_s=settings.webhook_durability_timeout_s,
            shards=settings.inbox_shards,
        )
        app.state.service = AppState(settings, state_redis, holder, writer)
        admin_redis = pool = None
        if admin_token:  # the only part of the web that enqueues (a retry, a campaign)
            pool = await queue.connect(queue.target(settings, redis_url))
            admin_redis = state_store.text_client(redis_url, cluster=settings.redis_cluster)
            deps = ProcessingDeps(settings, admin_redis, pool, holder)
            app.state.admin = AdminState(admin_token, admin_redis, deps)
        log.info(
            "web_started",
            rules=len(holder.current.rules),
            strategy=settings.salla_webhook_strategy,
            app_env=settings.app_env,
            admin_routes=bool(admin_token),
            durability=settings.webhook_durability,
        )
        # Start-up objects (modules, rules, settings) never become garbage: moving them out of
        # the collector's reach keeps its full collections short while webhooks are answered.
        gc.collect()
        gc.freeze()
        try:
            async with live_rules(holder, watch=settings.is_development):
                yield
        finally:
            await writer.aclose()
            await state_redis.aclose()
            if admin_redis is not None:
                await admin_redis.aclose()
            if pool is not None:
                await pool.aclose()

    return Starlette(
        routes=[
            Route("/webhooks/salla", _AsgiEndpoint(salla_webhook), methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *(admin_routes() if admin_token else []),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )
