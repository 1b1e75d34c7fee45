"""`create_app(settings)`: the HTTP edge. Routes, lifespan (Redis pool, rules).

The request path is short and does no outbound I/O:
route → read body (limited) → verify → parse → dedupe + persist (the inbox stream) → 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from arq.connections import ArqRedis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics, queue
from service.admin_http import AdminState
from service.admin_http import routes as admin_routes
from service.errors import PayloadTooLarge, RequestTimeout, WebhookError
from service.inbox import ensure_group
from service.logging import configure_logging, get_logger
from service.processing import APP_HANDLERS, SEEN_PREFIX, ProcessingDeps, handles
from service.rules import RuleSet
from service.rules.reloader import RulesHolder, live_rules
from service.settings import Settings
from service.webhooks import delivery_id, parse_envelope, verify

log = get_logger("service.web")


@dataclass
class AppState:
    settings: Settings
    pool: ArqRedis
    holder: RulesHolder
    writer: queue.EventWriter

    @property
    def rules(self) -> RuleSet:
        return self.holder.current


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.service
    return state


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g}s") from None
    return b"".join(chunks)


def _answer(http_status: int, /, **body: object) -> JSONResponse:
    return JSONResponse(body, status_code=http_status)


async def salla_webhook(request: Request) -> JSONResponse:
    state = _state(request)
    settings = state.settings
    started = time.perf_counter()
    trace_id = uuid.uuid4().hex[:16]
    bound = log.bind(trace_id=trace_id)
    try:
        body = await _read_body(request, settings.max_body_bytes, settings.request_body_timeout_s)
        verify(request.headers, body, settings.webhook_secret, settings.salla_webhook_strategy)
        env = parse_envelope(body)
    except WebhookError as exc:
        metrics.WEBHOOKS.labels("unknown", f"rejected_{exc.status_code}").inc()
        bound.warning(
            "webhook_rejected", status=exc.status_code, error=exc.message, duration_ms=_ms(started)
        )
        return _answer(exc.status_code, status="rejected", error=exc.message)
    bound = bound.bind(merchant=env.merchant, salla_event=env.event)
    if not handles(state.rules, env.event):
        metrics.WEBHOOKS.labels(env.event, "ignored").inc()
        bound.info("webhook_ignored", status=200, duration_ms=_ms(started))
        return _answer(200, status="ignored", event=env.event)
    delivery = delivery_id(env.merchant, env.event, body)
    try:
        if env.event in APP_HANDLERS:  # few, and they carry tokens: their own arq job
            accepted = await state.writer.enqueue(
                delivery, body, trace_id, seen_key=SEEN_PREFIX + delivery
            )
        else:
            accepted = await state.writer.accept(
                merchant=env.merchant,
                event=env.event,
                delivery=delivery,
                body=body,
                trace_id=trace_id,
                seen_key=SEEN_PREFIX + delivery,
                seen_ttl_s=settings.dedupe_ttl_s,
                retention_days=settings.webhook_retention_days,
            )
    except RedisError as exc:
        # Not persisted: a non-2xx answer makes Salla deliver it again later.
        bound.error("webhook_not_persisted", status=503, error=repr(exc), duration_ms=_ms(started))
        return _answer(503, status="error", error="could not persist the event; please retry")
    outcome = "accepted" if accepted else "duplicate"
    metrics.WEBHOOKS.labels(env.event, outcome).inc()
    bound.info(
        "webhook_received", status=200, outcome=outcome, delivery=delivery, duration_ms=_ms(started)
    )
    return _answer(200, status=outcome, trace_id=trace_id)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> JSONResponse:
    return _answer(200, status="ok")


async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    try:
        await state.pool.ping()
    except (RedisError, OSError) as exc:
        return _answer(503, status="unavailable", redis="unreachable", error=repr(exc))
    return _answer(200, status="ready", redis="ok", rules=len(state.rules.rules))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """404/405 and friends, as JSON like every other answer."""
    if not isinstance(exc, HTTPException):  # Starlette only routes HTTPException here
        return await _unexpected_error(request, exc)
    return _answer(exc.status_code, status="rejected", error=str(exc.detail))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected_error", path=request.url.path)
    return _answer(500, status="error", error="internal error; the event was not accepted")


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
        pool = await queue.connect(redis_url)
        await ensure_group(pool)  # before the first webhook is accepted: the worker reads from here
        app.state.service = AppState(settings, pool, holder, queue.EventWriter(pool))
        admin_redis = None
        if admin_token:
            admin_redis = Redis.from_url(redis_url, decode_responses=True)
            deps = ProcessingDeps(settings, admin_redis, pool, holder)
            app.state.admin = AdminState(admin_token, admin_redis, deps)
        log.info(
            "web_started",
            rules=len(holder.current.rules),
            strategy=settings.salla_webhook_strategy,
            app_env=settings.app_env,
            admin_routes=bool(admin_token),
        )
        # Start-up objects (modules, rules, settings) never become garbage: moving them out of
        # the collector's reach keeps its full collections short while webhooks are answered.
        gc.collect()
        gc.freeze()
        try:
            async with live_rules(holder, watch=settings.is_development):
                yield
        finally:
            await pool.aclose()
            if admin_redis is not None:
                await admin_redis.aclose()

    return Starlette(
        routes=[
            Route("/webhooks/salla", salla_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *(admin_routes() if admin_token else []),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )
