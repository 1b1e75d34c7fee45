"""The loyalty endpoints and the token endpoint, as Salla answers them.

    POST /customers/loyalty/points   validated against loyalty-points.openapi.yaml
    GET  /customers/loyalty/points   ?customer_id=&page= : points history, newest first
    POST /oauth2/token               refresh_token grant; refresh tokens are single-use

The loyalty endpoints are customers endpoints: they take from the plan bucket and from the
customers bucket, and answer with the customers bucket's `X-RateLimit-*` headers.
"""

from __future__ import annotations

import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.ids import parse_id
from service.sandbox.admin_api import admit, error, invalid, page_params, paginated
from service.sandbox.state import Counters, Store

if TYPE_CHECKING:
    from service.sandbox.app import Sandbox

SUCCESS_MESSAGE = "تم تحديث نقاط الولاء للعملاء بنجاح"
ACCESS_TTL_S = 14 * 86400


def request_schema() -> dict[str, Any]:
    """The request body schema of `POST /customers/loyalty/points`, from the spec file."""
    text = (
        resources.files("service.sandbox")
        .joinpath("loyalty-points.openapi.yaml")
        .read_text("utf-8")
    )
    spec = yaml.safe_load(text)
    schema: dict[str, Any] = spec["components"]["schemas"]["add_loyalty_points_request"]
    return {k: v for k, v in schema.items() if not k.startswith("x-")}


def apply(store: Store, counters: Counters, body: dict[str, Any]) -> None:
    """Apply an accepted `POST /customers/loyalty/points` body to the store's balances and
    points histories (newest first). The caller holds the sandbox's lock."""
    sign = 1 if body["type"] == "plus" else -1
    reset = body.get("reset_points") is True
    points = 0 if reset else int(body["points"])
    targets = body["customers"]
    if body.get("select_all"):
        targets = sorted(store.known_customers | set(store.balances))
    for raw_id in targets:
        customer = int(raw_id)
        counters.entry_seq += 1
        if reset:
            points = store.balances.get(customer, 0)
            sign = -1
        store.balances[customer] = store.balances.get(customer, 0) + sign * points
        store.history.setdefault(customer, []).insert(
            0,
            {
                "id": counters.entry_seq,
                "points": sign * points,
                "used_points": 0,
                "type": body["type"],
                "status": "active",
                "notes": body["reason"],
                "order_id": None,
                "reference_id": None,
                "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
    store.calls.append(body)
    store.count("applied")


class _Dropped(Response):
    """Starts the answer, then breaks the connection: the client never learns the outcome."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"status":', "more_body": True})
        raise ConnectionAbortedError("sandbox fault: connection dropped after applying")


def routes(box: Sandbox) -> list[Route]:
    async def add_points(request: Request) -> Response:
        store = await admit(box, request, customers=True)
        if isinstance(store, Response):
            return store
        headers = store.bucket.headers()
        try:
            body = await request.json()
        except ValueError:
            return error(400, "error", "body is not JSON", headers)
        validator = box.validator
        if isinstance(body, dict) and body.get("reset_points") is True:
            validator = box.reset_validator  # the spec: points "required unless" resetting
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        if errors:
            fields: dict[str, list[str]] = {}
            for err in errors:
                name = (
                    str(err.path[0])
                    if err.path
                    else (err.message.split("'")[1] if "'" in err.message else "body")
                )
                fields.setdefault(name, []).append(err.message)
            store.count("invalid_body")
            return invalid(headers, fields)
        invalid_ids = [c for c in body["customers"] if int(c) in store.faults.invalid_customers]
        if invalid_ids:
            store.count("invalid_customers")
            return invalid(
                headers, {"customers": [f"حقل customers غير صالح: {c}" for c in invalid_ids]}
            )
        if store.faults.drop_before_apply > 0:
            store.faults.drop_before_apply -= 1
            store.count("dropped_before_apply")
            return _Dropped()
        box.apply(store, body)
        if store.faults.drop_after_apply > 0:
            store.faults.drop_after_apply -= 1
            store.count("dropped_after_apply")
            return _Dropped()
        return JSONResponse(
            {"status": 201, "success": True, "data": {"code": 201, "message": SUCCESS_MESSAGE}},
            201,
            store.bucket.headers(),
        )

    async def points_history(request: Request) -> Response:
        store = await admit(box, request, customers=True)
        if isinstance(store, Response):
            return store
        headers = store.bucket.headers()
        customer = parse_id(request.query_params.get("customer_id", ""))
        if customer is None:
            return invalid(headers, {"customer_id": ["customer_id is required"]})
        paging = page_params(request)
        if isinstance(paging, dict):
            return invalid(headers, paging)
        entries = store.history.get(customer, [])
        return paginated(request, entries, *paging, headers)

    async def oauth_token(request: Request) -> Response:
        # Salla's token endpoint takes application/x-www-form-urlencoded.
        form = {
            k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()
        }
        if form.get("grant_type") != "refresh_token":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        presented = str(form.get("refresh_token", ""))
        with box.lock:
            for store in box.stores.values():
                if presented and secrets.compare_digest(presented, store.refresh_token):
                    store.used_refresh_tokens.add(presented)
                    store.access_token = secrets.token_urlsafe(24)
                    store.refresh_token = secrets.token_urlsafe(24)
                    store.access_expires_at = time.time() + ACCESS_TTL_S
                    store.count("refreshed")
                    box.changed()
                    return JSONResponse(
                        {
                            "access_token": store.access_token,
                            "token_type": "bearer",
                            "expires_in": ACCESS_TTL_S,
                            "refresh_token": store.refresh_token,
                            "scope": store.scope,
                        }
                    )
                if presented in store.used_refresh_tokens:
                    # Salla revokes both tokens when a refresh token is used twice.
                    store.access_token = secrets.token_urlsafe(24) + "-revoked"
                    store.refresh_token = secrets.token_urlsafe(24) + "-revoked"
                    store.count("refresh_reuse")
                    box.changed()
                    return JSONResponse(
                        {
                            "error": "invalid_grant",
                            "error_description": "refresh token already used",
                        },
                        400,
                    )
        return JSONResponse(
            {"error": "invalid_grant", "error_description": "unknown refresh token"}, 400
        )

    return [
        Route("/customers/loyalty/points", add_points, methods=["POST"]),
        Route("/customers/loyalty/points", points_history, methods=["GET"]),
        Route("/oauth2/token", oauth_token, methods=["POST"]),
    ]
