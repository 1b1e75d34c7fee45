"""Control routes under `/_sandbox/` for tests, `run` and benchmarks (docs/sandbox.md).

    POST   /_sandbox/stores                       install a store (replaces one with that id)
    PATCH  /_sandbox/stores/{merchant}            change scope, buckets, order_cancelled_event
    GET    /_sandbox/stores/{merchant}            everything the store keeps, tokens included
    POST   /_sandbox/stores/{merchant}/expire     expire the current access token
    POST   /_sandbox/faults                       Admin API fault switches
    POST   /_sandbox/orders                       create or change an order, send its webhooks
    GET    /_sandbox/orders/{merchant}/{order_id} the order as Order Details shows it
    DELETE /_sandbox/orders/{merchant}/{order_id} delete it, send order.deleted
    GET    /_sandbox/webhooks?merchant=&order_id= the webhook log, with each webhook's fate
    POST   /_sandbox/webhooks/release             send held webhooks: as_is, reverse, shuffle
    POST   /_sandbox/webhooks/outage              every delivery fails while on
    POST   /_sandbox/reset                        forget every store
    GET    /_sandbox/health                       200 once serving

Bad input gets 400 (404 for an unknown store or order) with `{"error": "<sentence>"}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import ServiceError
from service.ids import parse_id
from service.sandbox.state import Faults, Store

if TYPE_CHECKING:
    from service.sandbox.app import Sandbox

RELEASE_ORDERS = ("as_is", "reverse", "shuffle")


class _BadRequest(ServiceError):
    """A control request the sandbox refuses with 400 (the message says why)."""


async def _body(request: Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip() and not required:
        return {}
    try:
        doc = await request.json()
    except ValueError:
        raise _BadRequest("the body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise _BadRequest("the body must be a JSON object")
    return doc


def _merchant(value: object, *, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    merchant = parse_id(value)
    if merchant is None:
        raise _BadRequest("'merchant' must be a store id (a positive integer)")
    return merchant


def _store_view(store: Store) -> dict[str, Any]:
    return {
        "merchant": store.merchant,
        "access_token": store.access_token,
        "refresh_token": store.refresh_token,
        "expires": int(store.access_expires_at),
        "scope": store.scope,
        "rate_limit": {"limit": store.bucket.limit, "window_s": store.bucket.window_s},
        "plan_rate_limit": {
            "limit": store.plan_bucket.limit,
            "window_s": store.plan_bucket.window_s,
        },
        "order_cancelled_event": store.order_cancelled_event,
        "outage": store.outage,
        "balances": {str(k): v for k, v in store.balances.items()},
        "history": {str(k): v for k, v in store.history.items()},
        "calls": store.calls,
        "counters": store.counters,
        "orders": [
            {
                "id": o.id,
                "reference_id": o.reference_id,
                "status": o.status,
                "total": str(o.total),
                "customer_id": o.customer_id,
            }
            for o in sorted(store.orders.values(), key=lambda o: o.id)
        ],
        "webhooks": store.webhooks,
        "held": [h.log_id for h in store.held],
    }


def routes(box: Sandbox) -> list[Route]:
    def handled(handler: Any) -> Any:
        """Map input problems to 400 and unknown stores or orders to 404."""

        async def endpoint(request: Request) -> Response:
            try:
                answer: Response = await handler(request)
            except (_BadRequest, ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, 400)
            except LookupError as exc:
                return JSONResponse({"error": str(exc).strip("'\"")}, 404)
            return answer

        return endpoint

    async def add_store(request: Request) -> Response:
        doc = await _body(request)
        merchant = _merchant(doc.get("merchant"))
        assert merchant is not None
        store = box.add_store(merchant, **{k: v for k, v in doc.items() if k != "merchant"})
        return JSONResponse(
            {
                "merchant": store.merchant,
                "access_token": store.access_token,
                "refresh_token": store.refresh_token,
                "expires": int(store.access_expires_at),
                "scope": store.scope,
            },
            201,
        )

    async def update_store(request: Request) -> Response:
        store = box.update_store(request.path_params["merchant"], **(await _body(request)))
        with box.lock:
            return JSONResponse(_store_view(store))

    async def view_store(request: Request) -> Response:
        with box.lock:
            return JSONResponse(_store_view(box.store(request.path_params["merchant"])))

    async def expire(request: Request) -> Response:
        box.store(request.path_params["merchant"]).access_expires_at = 0
        box.changed()
        return JSONResponse({"expired": True})

    async def faults(request: Request) -> Response:
        doc = await _body(request)
        merchant = _merchant(doc.get("merchant"), required=False)
        targets = [box.store(merchant)] if merchant else list(box.stores.values())
        for store in targets:
            store.faults = Faults(
                statuses=[int(s) for s in doc.get("statuses", [])],
                latency_s=float(doc.get("latency_s", 0)),
                drop_after_apply=int(doc.get("drop_after_apply", 0)),
                drop_before_apply=int(doc.get("drop_before_apply", 0)),
                invalid_customers={int(c) for c in doc.get("invalid_customers", [])},
                orders_statuses=[int(s) for s in doc.get("orders_statuses", [])],
                orders_latency_s=float(doc.get("orders_latency_s", 0)),
            )
        return JSONResponse({"stores": [s.merchant for s in targets]})

    async def change_order(request: Request) -> Response:
        doc = await _body(request)
        merchant = _merchant(doc.pop("merchant", None))
        assert merchant is not None
        order_id = doc.pop("order_id", None)
        if order_id is not None and parse_id(order_id) is None:
            raise _BadRequest("'order_id' must be a positive integer")
        result = await box.change_order_async(merchant, parse_id(order_id), **doc)
        return JSONResponse(result, 200)

    async def view_order(request: Request) -> Response:
        merchant, order_id = request.path_params["merchant"], request.path_params["order_id"]
        order = box.order(merchant, order_id)
        if order is None:
            raise LookupError(f"store {merchant} has no order {order_id}")
        return JSONResponse(order)

    async def delete_order(request: Request) -> Response:
        doc = await _body(request, required=False)
        merchant, order_id = request.path_params["merchant"], request.path_params["order_id"]
        return JSONResponse(await box.delete_order_async(merchant, order_id, doc.get("webhook")))

    async def webhook_log(request: Request) -> Response:
        merchant = _merchant(request.query_params.get("merchant"), required=False)
        order_id = parse_id(request.query_params.get("order_id", ""))
        with box.lock:
            stores = [box.store(merchant)] if merchant else list(box.stores.values())
            entries = [
                entry
                for store in stores
                for entry in store.webhooks
                if order_id is None or entry.get("order_id") == order_id
            ]
            return JSONResponse({"webhooks": sorted(entries, key=lambda e: e["id"])})

    async def release(request: Request) -> Response:
        doc = await _body(request, required=False)
        order = doc.get("order", "as_is")
        if order not in RELEASE_ORDERS:
            raise _BadRequest(f"'order' must be one of {', '.join(RELEASE_ORDERS)}")
        seed = doc.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _BadRequest("'seed' must be an integer")
        merchant = _merchant(doc.get("merchant"), required=False)
        released = await box.release_webhooks_async(merchant, order, seed)
        return JSONResponse({"released": released})

    async def outage(request: Request) -> Response:
        doc = await _body(request)
        if not isinstance(doc.get("on"), bool):
            raise _BadRequest("'on' must be true or false")
        merchant = _merchant(doc.get("merchant"), required=False)
        box.set_outage(doc["on"], merchant)
        return JSONResponse({"outage": doc["on"], "merchant": merchant})

    async def reset(request: Request) -> Response:
        with box.lock:
            box.stores.clear()
        box.changed()
        return JSONResponse({"reset": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "stores": len(box.stores)})

    store_path = "/_sandbox/stores/{merchant:int}"
    order_path = "/_sandbox/orders/{merchant:int}/{order_id:int}"
    table: list[tuple[str, Any, str]] = [
        ("/_sandbox/stores", add_store, "POST"),
        (store_path, update_store, "PATCH"),
        (store_path, view_store, "GET"),
        (f"{store_path}/expire", expire, "POST"),
        ("/_sandbox/faults", faults, "POST"),
        ("/_sandbox/orders", change_order, "POST"),
        (order_path, view_order, "GET"),
        (order_path, delete_order, "DELETE"),
        ("/_sandbox/webhooks", webhook_log, "GET"),
        ("/_sandbox/webhooks/release", release, "POST"),
        ("/_sandbox/webhooks/outage", outage, "POST"),
        ("/_sandbox/reset", reset, "POST"),
        ("/_sandbox/health", health, "GET"),
    ]
    return [Route(path, handled(handler), methods=[method]) for path, handler, method in table]
