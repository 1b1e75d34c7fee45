"""HTTP routes under /admin/, mounted only when ADMIN_TOKEN is set. Bearer-token protected.

GET  /admin/stores/{merchant}                       token, queue, rate-limit budget, failed
GET  /admin/stores/{merchant}/orders/{order_id}     the ledger for one order
GET  /admin/stores/{merchant}/customers/{customer}  one customer's grants
GET  /admin/export?since=&until=&merchant=&format=jsonl|csv   the ledger, streamed
POST /admin/replay?since=&until=&merchant=&dry_run=true|false stored webhooks, current rules
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from service import admin
from service.logging import get_logger
from service.processing import ProcessingDeps

log = get_logger("service.admin")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class AdminState:
    token: str
    redis: Redis
    deps: ProcessingDeps


def _admin(request: Request) -> AdminState:
    state: AdminState = request.app.state.admin
    return state


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "rejected", "error": message}, status_code=status)


def _protected(handler: Handler) -> Handler:
    async def guarded(request: Request) -> Response:
        state = _admin(request)
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), state.token.encode()
        ):
            log.warning("admin_refused", path=request.url.path, status=401)
            return JSONResponse(
                {"status": "rejected", "error": "send 'Authorization: Bearer <ADMIN_TOKEN>'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            response = await handler(request)
        except admin.AdminInputError as exc:
            return _error(400, str(exc))
        log.info("admin_request", path=request.url.path, status=response.status_code)
        return response

    return guarded


def _merchant_query(request: Request) -> int | None:
    value = request.query_params.get("merchant")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise admin.AdminInputError("'merchant' must be a store id (digits)")
    return int(value)


def _range(request: Request) -> tuple[int, int]:
    return admin.time_range(request.query_params.get("since"), request.query_params.get("until"))


def _path_int(request: Request, name: str) -> int:
    value: int = request.path_params[name]
    return value


async def store(request: Request) -> Response:
    state = _admin(request)
    merchant = _path_int(request, "merchant")
    return JSONResponse(await admin.store_state(state.redis, state.deps.settings, merchant))


async def order(request: Request) -> Response:
    state = _admin(request)
    view = await admin.order_ledger(
        state.redis, _path_int(request, "merchant"), _path_int(request, "order_id")
    )
    return JSONResponse(view, status_code=200 if view["found"] else 404)


async def customer(request: Request) -> Response:
    state = _admin(request)
    view = await admin.customer_ledger(
        state.redis, _path_int(request, "merchant"), _path_int(request, "customer")
    )
    return JSONResponse(view)


async def export(request: Request) -> Response:
    state = _admin(request)
    fmt = request.query_params.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise admin.AdminInputError("'format' is jsonl or csv")
    start, end = _range(request)
    merchant = _merchant_query(request)

    async def lines() -> AsyncIterator[str]:
        if fmt == "csv":
            yield admin.csv_header()
        async for row in admin.export_grants(state.redis, start, end, merchant):
            yield admin.export_line(row, fmt)

    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return StreamingResponse(lines(), media_type=f"{media}; charset=utf-8")


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise admin.AdminInputError(f"'{name}' is true or false")


async def replay(request: Request) -> Response:
    state = _admin(request)
    start, end = _range(request)
    merchant = _merchant_query(request)
    dry_run = _flag(request, "dry_run", True)

    async def lines() -> AsyncIterator[str]:
        events = changed = 0
        async for line in admin.replay(state.deps, start, end, merchant=merchant, dry_run=dry_run):
            events += 1
            if line.diffs:
                changed += 1
                yield json.dumps(line.as_dict(), ensure_ascii=False) + "\n"
        log.info("replay_finished", dry_run=dry_run, webhooks=events, changed=changed)
        summary = {"summary": {"webhooks": events, "changed": changed, "dry_run": dry_run}}
        yield json.dumps(summary) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson; charset=utf-8")


def routes() -> list[BaseRoute]:
    return [
        Route("/admin/stores/{merchant:int}", _protected(store), methods=["GET"]),
        Route(
            "/admin/stores/{merchant:int}/orders/{order_id:int}",
            _protected(order),
            methods=["GET"],
        ),
        Route(
            "/admin/stores/{merchant:int}/customers/{customer:int}",
            _protected(customer),
            methods=["GET"],
        ),
        Route("/admin/export", _protected(export), methods=["GET"]),
        Route("/admin/replay", _protected(replay), methods=["POST"]),
    ]
