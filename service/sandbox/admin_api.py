"""What every Admin API call of the sandbox goes through, and Salla's envelopes.

A call is admitted in this order: a known, unexpired bearer token (else 401); room in the
store's buckets (else 429 with `Retry-After`): every call takes from the plan bucket, the
customers endpoints (the loyalty endpoints) from the customers bucket too; the scope the
endpoint needs (else 401); then the store's fault switches for that kind of call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.ids import parse_digits
from service.sandbox.buckets import take_all
from service.sandbox.state import Store

if TYPE_CHECKING:
    from service.sandbox.app import Sandbox


def error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    fields: dict[str, list[str]] | None = None,
) -> JSONResponse:
    """Salla's error envelope: `{"status", "success": false, "error": {code, message, fields?}}`."""
    body: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        body["fields"] = fields
    return JSONResponse({"status": status, "success": False, "error": body}, status, headers)


def invalid(headers: Mapping[str, str], fields: dict[str, list[str]]) -> JSONResponse:
    return error(422, "error", "alert.invalid_fields", headers, fields)


def bearer(request: Request) -> str:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def rate_headers(store: Store, customers: bool) -> dict[str, str]:
    """Loyalty answers carry the customers bucket's headers, every other the plan bucket's."""
    return (store.bucket if customers else store.plan_bucket).headers()


async def admit(
    box: Sandbox, request: Request, *, customers: bool, scope: str | None = None
) -> Store | Response:
    """The store the call may act on, or the answer refusing it."""
    store = box.by_access_token(bearer(request))
    if store is None:
        return error(401, "Unauthorized", "The access token is invalid")
    if time.time() >= store.access_expires_at:
        store.count("expired_token")
        return error(401, "Unauthorized", "The access token has expired")
    buckets = (store.bucket, store.plan_bucket) if customers else (store.plan_bucket,)
    allowed, retry_after = take_all(*buckets)
    if not allowed:
        store.count("rate_limited" if customers else "orders_rate_limited")
        headers = {**rate_headers(store, customers), "Retry-After": str(math.ceil(retry_after))}
        return error(429, "TooManyRequests", "Too many requests", headers)
    if scope is not None and not store.has_scope(scope):
        store.count("missing_scope")
        return error(
            401,
            "Unauthorized",
            f"The access token does not have the scope {scope}",
            rate_headers(store, customers),
        )
    faults = store.faults
    latency_s = faults.latency_s if customers else faults.orders_latency_s
    statuses = faults.statuses if customers else faults.orders_statuses
    if latency_s:
        await asyncio.sleep(latency_s)
    if statuses:
        status = statuses.pop(0)
        store.count(f"fault_{status}" if customers else f"orders_fault_{status}")
        headers = rate_headers(store, customers)
        if status == 429:
            headers["Retry-After"] = "1"
        return error(status, "error", f"sandbox fault {status}", headers)
    return store


def page_params(
    request: Request, *, per_page: int = 15, max_per_page: int = 15
) -> tuple[int, int] | dict[str, list[str]]:
    """`(page, per_page)` from the query string, or the problems with them."""
    problems: dict[str, list[str]] = {}
    raw_page = request.query_params.get("page", "1").strip() or "1"
    raw_per_page = request.query_params.get("per_page", str(per_page)).strip() or str(per_page)
    page, size = parse_digits(raw_page), parse_digits(raw_per_page)  # "²" is no page number
    if page is None or page < 1:
        problems["page"] = ["page must be a positive number"]
    if size is None or not 1 <= size <= max_per_page:
        problems["per_page"] = [f"per_page must be between 1 and {max_per_page}"]
    if problems or page is None or size is None:
        return problems
    return page, size


def paginated(
    request: Request, items: list[Any], page: int, per_page: int, headers: Mapping[str, str]
) -> JSONResponse:
    """Salla's list answer: `data` and `pagination{count, total, perPage, currentPage,
    totalPages, links}`; `links` has `next`/`previous` URLs where those pages exist."""
    chunk = items[(page - 1) * per_page : page * per_page]
    total_pages = max(1, math.ceil(len(items) / per_page))
    links: dict[str, str] = {}
    if page < total_pages:
        links["next"] = str(request.url.include_query_params(page=page + 1))
    if page > 1:
        links["previous"] = str(request.url.include_query_params(page=page - 1))
    return JSONResponse(
        {
            "status": 200,
            "success": True,
            "data": chunk,
            "pagination": {
                "count": len(chunk),
                "total": len(items),
                "perPage": per_page,
                "currentPage": page,
                "totalPages": total_pages,
                "links": links,
            },
        },
        200,
        headers,
    )
