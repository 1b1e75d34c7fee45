"""HTTP routes under /admin/, mounted only when ADMIN_TOKEN is set. Bearer-token protected.

GET  /admin/stores/{merchant}                       token, queue, rate-limit budget, failed
GET  /admin/stores/{merchant}/orders/{order_id}     the ledger for one order
GET  /admin/stores/{merchant}/customers/{customer}  one customer's grants
GET  /admin/export?since=&until=&merchant=&format=jsonl|csv   the ledger, streamed
POST /admin/replay?since=&until=&merchant=&dry_run=true|false stored webhooks, current rules

Every error answer has the documented shape `{"status": "rejected", "error": "<a sentence>"}`
(400 a bad id, date or flag; 401 no or a wrong token; 404 nothing there), and a 500 says so
without pretending to be about a webhook (app.py's handler).
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

from service.admin import export as exporting
from service.admin import queries
from service.admin import replay as replaying
from service.admin.times import time_range
from service.errors import AdminInputError
from service.ids import WHAT_AN_ID_IS, parse_id
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
        except AdminInputError as exc:
            return _error(400, str(exc))
        log.info("admin_request", path=request.url.path, status=response.status_code)
        return response

    return guarded


def _id(value: str, name: str) -> int:
    """An id from a path or a query: ASCII digits only (see service/ids.py), else a 400."""
    parsed = parse_id(value)
    if parsed is None:
        shown = value if len(value) <= 24 else value[:24] + "..."
        raise AdminInputError(f"'{name}' must be an id ({WHAT_AN_ID_IS}), not {shown!r}")
    return parsed


def _merchant_query(request: Request) -> int | None:
    value = request.query_params.get("merchant")
    if value is None or value == "":
        return None
    return _id(value, "merchant")


def _range(request: Request) -> tuple[int, int]:
    return time_range(request.query_params.get("since"), request.query_params.get("until"))


def _path_id(request: Request, name: str) -> int:
    return _id(str(request.path_params[name]), name)


async def store(request: Request) -> Response:
    state = _admin(request)
    merchant = _path_id(request, "merchant")
    return JSONResponse(await queries.store_state(state.redis, state.deps.settings, merchant))


async def order(request: Request) -> Response:
    state = _admin(request)
    merchant, order_id = _path_id(request, "merchant"), _path_id(request, "order_id")
    view = await queries.order_ledger(state.redis, merchant, order_id)
    if not view["found"]:
        return _error(404, f"the ledger has nothing for order {order_id} of store {merchant}")
    return JSONResponse(view)


async def customer(request: Request) -> Response:
    state = _admin(request)
    view = await queries.customer_ledger(
        state.redis, _path_id(request, "merchant"), _path_id(request, "customer")
    )
    return JSONResponse(view)


async def export(request: Request) -> Response:
    state = _admin(request)
    fmt = request.query_params.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise AdminInputError("'format' is jsonl or csv")
    start, end = _range(request)
    merchant = _merchant_query(request)

    async def lines() -> AsyncIterator[str]:
        if fmt == "csv":
            yield exporting.csv_header()
        async for row in exporting.export_grants(state.redis, start, end, merchant):
            yield exporting.export_line(row, fmt)

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
    raise AdminInputError(f"'{name}' is true or false")


async def replay(request: Request) -> Response:
    state = _admin(request)
    start, end = _range(request)
    merchant = _merchant_query(request)
    dry_run = _flag(request, "dry_run", True)

    async def lines() -> AsyncIterator[str]:
        tally = replaying.ReplayTally()
        async for line in replaying.replay(
            state.deps, start, end, merchant=merchant, dry_run=dry_run
        ):
            tally.add(line)
            if line.diffs or line.skipped is not None:  # what differs, and what could not run
                yield json.dumps(line.as_dict(), ensure_ascii=False) + "\n"
        events, changed, skipped = tally.webhooks, tally.changed, tally.skipped
        log.info(
            "replay_finished", dry_run=dry_run, webhooks=events, changed=changed, skipped=skipped
        )
        summary = {"webhooks": events, "changed": changed, "skipped": skipped, "dry_run": dry_run}
        yield json.dumps({"summary": summary}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson; charset=utf-8")


def routes() -> list[BaseRoute]:
    return [
        # Ids are read by `_path_id`, not by Starlette's `int` convertor: that one answers a
        # non-digit id with a bare 404 and a 5,000-digit one with a 500 (int() refuses it).
        Route("/admin/stores/{merchant}", _protected(store), methods=["GET"]),
        Route("/admin/stores/{merchant}/orders/{order_id}", _protected(order), methods=["GET"]),
        Route(
            "/admin/stores/{merchant}/customers/{customer}", _protected(customer), methods=["GET"]
        ),
        Route("/admin/export", _protected(export), methods=["GET"]),
        Route("/admin/replay", _protected(replay), methods=["POST"]),
    ]
