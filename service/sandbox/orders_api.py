"""Salla's orders endpoints (FACTS 4.1). Each needs the `orders.read` scope and takes from the
store's plan bucket only; answers carry that bucket's `X-RateLimit-*` headers.

    GET /orders                       List Orders: from_date, to_date (yyyy-mm-dd, whole days of
                                      the creation date, Riyadh), status[] (ids), customer_id,
                                      reference_id, sort_by (id-desc default, id-asc), page,
                                      per_page (15 default, at most 100). No customer in items.
    GET /orders/{order_id}            Order Details; ?format=light drops items and the
                                      customer's groups; ?reference_id= finds the order by its
                                      reference instead of the path's id.
    GET /orders/{order_id}/histories  status changes, newest first, 15 a page
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.ids import parse_id
from service.sandbox import orders
from service.sandbox.admin_api import admit, error, invalid, page_params, paginated
from service.sandbox.state import Store

if TYPE_CHECKING:
    from service.sandbox.app import Sandbox

SCOPE = "orders.read"
LIST_PER_PAGE = 15
LIST_MAX_PER_PAGE = 100


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The filters of List Orders; dates are whole days of the creation date, Riyadh time."""

    from_date: dt.date | None = None
    to_date: dt.date | None = None
    status_ids: frozenset[int] = frozenset()
    customer_id: int | None = None
    reference_id: int | None = None
    ascending: bool = False


SORTS = {"id-desc": False, "id-asc": True}


def parse_list_query(params: Iterable[tuple[str, str]]) -> tuple[ListQuery, dict[str, list[str]]]:
    """`(query, problems)` from query-string pairs; problems map a field to its messages."""
    problems: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    status_ids: set[int] = set()
    for key, raw in params:
        text = raw.strip()
        if key in ("from_date", "to_date"):
            try:
                values[key] = dt.date.fromisoformat(text)
            except ValueError:
                problems.setdefault(key, []).append(f"{key} must be a date yyyy-mm-dd")
        elif key in ("status[]", "status"):
            for part in text.split(","):
                status_id = parse_id(part)
                if status_id is not None:
                    status_ids.add(status_id)
                else:
                    problems.setdefault("status", []).append("status must be status ids")
        elif key in ("customer_id", "reference_id"):
            number = parse_id(text)
            if number is not None:
                values[key] = number
            else:
                problems.setdefault(key, []).append(f"{key} must be a number")
        elif key == "sort_by":
            if text in SORTS:
                values["ascending"] = SORTS[text]
            else:
                problems.setdefault(key, []).append(f"sort_by must be one of {', '.join(SORTS)}")
    return ListQuery(status_ids=frozenset(status_ids), **values), problems


def select(records: Iterable[orders.Order], query: ListQuery) -> list[orders.Order]:
    """The orders matching `query`, sorted by id as it asks."""
    wanted = [
        order
        for order in records
        if (query.from_date is None or orders.local_date(order.created_s) >= query.from_date)
        and (query.to_date is None or orders.local_date(order.created_s) <= query.to_date)
        and (not query.status_ids or orders.STATUSES[order.status].id in query.status_ids)
        and (query.customer_id is None or order.customer_id == query.customer_id)
        and (query.reference_id is None or order.reference_id == query.reference_id)
    ]
    return sorted(wanted, key=lambda order: order.id, reverse=not query.ascending)


def _find(store: Store, request: Request) -> orders.Order | None:
    reference = request.query_params.get("reference_id", "").strip()
    if reference:
        if not reference.isdigit():
            return None
        return next((o for o in store.orders.values() if o.reference_id == int(reference)), None)
    raw_id = str(request.path_params["order_id"])
    return store.orders.get(int(raw_id)) if raw_id.isdigit() else None


def _not_found(headers: dict[str, str]) -> JSONResponse:
    return error(404, "NotFound", "The order was not found", headers)


Handler = Callable[[Request, Store, dict[str, str]], Awaitable[Response]]


def routes(box: Sandbox) -> list[Route]:
    def orders_call(counter: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Admit the call (token, plan bucket, `orders.read`, faults), count it, and hand the
        handler the store and the plan bucket's headers."""

        async def endpoint(request: Request) -> Response:
            store = await admit(box, request, customers=False, scope=SCOPE)
            if isinstance(store, Response):
                return store
            store.count(counter)
            return await handler(request, store, store.plan_bucket.headers())

        return endpoint

    async def list_orders(request: Request, store: Store, headers: dict[str, str]) -> Response:
        query, problems = parse_list_query(request.query_params.multi_items())
        paging = page_params(request, per_page=LIST_PER_PAGE, max_per_page=LIST_MAX_PER_PAGE)
        if isinstance(paging, dict):
            problems.update(paging)
        if problems or isinstance(paging, dict):
            return invalid(headers, problems)
        with box.lock:
            items = [orders.list_item(o) for o in select(store.orders.values(), query)]
        return paginated(request, items, *paging, headers)

    async def order_details(request: Request, store: Store, headers: dict[str, str]) -> Response:
        light = request.query_params.get("format") == "light"
        with box.lock:
            order = _find(store, request)
            doc = None if order is None else orders.render(order, light=light)
        if doc is None:
            return _not_found(headers)
        return JSONResponse({"status": 200, "success": True, "data": doc}, 200, headers)

    async def order_histories(request: Request, store: Store, headers: dict[str, str]) -> Response:
        paging = page_params(request)
        if isinstance(paging, dict):
            return invalid(headers, paging)
        with box.lock:
            raw_id = str(request.path_params["order_id"])
            order = store.orders.get(int(raw_id)) if raw_id.isdigit() else None
            entries = (
                None
                if order is None
                else [orders.history_item(e) for e in reversed(order.histories)]
            )
        if entries is None:
            return _not_found(headers)
        return paginated(request, entries, *paging, headers)

    return [
        Route("/orders", orders_call("orders_list", list_orders), methods=["GET"]),
        Route("/orders/{order_id}", orders_call("orders_get", order_details), methods=["GET"]),
        Route(
            "/orders/{order_id}/histories",
            orders_call("orders_histories", order_histories),
            methods=["GET"],
        ),
    ]
