"""The sandbox: behaves like Salla's Admin API for the calls this service makes.

Salla-shaped endpoints:
    POST /customers/loyalty/points     validated against loyalty-points.openapi.yaml
    GET  /customers/loyalty/points     ?customer_id=&page= : points history, newest first
    POST /oauth2/token                 refresh_token grant; refresh tokens are single-use

Control endpoints (tests, `run`, benchmarks):
    POST /_sandbox/stores              {merchant, access_token?, refresh_token?, rate_limit?,
                                        rate_window_s?, access_ttl_s?} → the store's tokens
    GET  /_sandbox/stores/{merchant}   balances, histories, received calls, counters
    POST /_sandbox/stores/{merchant}/expire     expire the current access token
    POST /_sandbox/faults              {merchant?, statuses: [503, 429, ...], latency_s,
                                        drop_after_apply: n, drop_before_apply: n,
                                        invalid_customers: [ids]}
    POST /_sandbox/reset               forget everything
    GET  /_sandbox/health              200 once the sandbox is serving

Every answer carries `X-RateLimit-Limit/Remaining/Reset`; over the per-store leaky bucket the
answer is 429 with `Retry-After`, as Salla does.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import jsonschema
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

SUCCESS_MESSAGE = "تم تحديث نقاط الولاء للعملاء بنجاح"


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


@dataclass
class Bucket:
    """Salla's leaky bucket: `limit` requests per `window_s`, leaking continuously."""

    limit: int
    window_s: float
    level: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    @property
    def leak_per_s(self) -> float:
        return self.limit / self.window_s

    def take(self) -> tuple[bool, float]:
        now = time.monotonic()
        self.level = max(0.0, self.level - (now - self.updated) * self.leak_per_s)
        self.updated = now
        if self.level + 1 > self.limit:
            return False, (self.level + 1 - self.limit) / self.leak_per_s
        self.level += 1
        return True, 0.0

    def headers(self) -> dict[str, str]:
        remaining = max(0, math.floor(self.limit - self.level))
        reset = int(time.time() + self.level / self.leak_per_s)
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        }


@dataclass
class Faults:
    statuses: list[int] = field(default_factory=list)
    latency_s: float = 0.0
    drop_after_apply: int = 0
    drop_before_apply: int = 0
    invalid_customers: set[int] = field(default_factory=set)


@dataclass
class Store:
    merchant: int
    access_token: str
    refresh_token: str
    access_expires_at: float
    bucket: Bucket
    faults: Faults = field(default_factory=Faults)
    balances: dict[int, int] = field(default_factory=dict)
    history: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    used_refresh_tokens: set[str] = field(default_factory=set)
    #: The store's customers, for `select_all` (those with points are always included).
    known_customers: set[int] = field(default_factory=set)

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


class Sandbox:
    """All sandbox state; one per app. Inspectable by tests in-process or over HTTP."""

    def __init__(self, rate_limit: int = 500, rate_window_s: float = 600.0) -> None:
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.stores: dict[int, Store] = {}
        self.validator = jsonschema.Draft202012Validator(request_schema())
        reset_schema = request_schema()
        reset_schema["required"] = [r for r in reset_schema["required"] if r != "points"]
        self.reset_validator = jsonschema.Draft202012Validator(reset_schema)
        self.entry_seq = 1000

    def add_store(self, merchant: int, /, **options: Any) -> Store:
        store = Store(
            merchant=merchant,
            access_token=options.get("access_token") or secrets.token_urlsafe(24),
            refresh_token=options.get("refresh_token") or secrets.token_urlsafe(24),
            access_expires_at=time.time() + float(options.get("access_ttl_s", 14 * 86400)),
            bucket=Bucket(
                int(options.get("rate_limit", self.rate_limit)),
                float(options.get("rate_window_s", self.rate_window_s)),
            ),
        )
        store.known_customers = {int(c) for c in options.get("customers", [])}
        self.stores[merchant] = store
        return store

    def by_access_token(self, token: str) -> Store | None:
        for store in self.stores.values():
            if token and secrets.compare_digest(store.access_token, token):
                return store
        return None

    def apply(self, store: Store, body: dict[str, Any]) -> None:
        sign = 1 if body["type"] == "plus" else -1
        reset = body.get("reset_points") is True
        points = 0 if reset else int(body["points"])
        targets = body["customers"]
        if body.get("select_all"):
            targets = sorted(store.known_customers | set(store.balances))
        for raw_id in targets:
            customer = int(raw_id)
            self.entry_seq += 1
            if reset:
                points = store.balances.get(customer, 0)
                sign = -1
            store.balances[customer] = store.balances.get(customer, 0) + sign * points
            store.history.setdefault(customer, []).insert(
                0,
                {
                    "id": self.entry_seq,
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


def _error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    fields: dict[str, list[str]] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        error["fields"] = fields
    return JSONResponse({"status": status, "success": False, "error": error}, status, headers)


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


def _bearer(request: Request) -> str:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def create_sandbox_app(sandbox: Sandbox | None = None) -> Starlette:
    box = sandbox or Sandbox()

    async def authorized(request: Request) -> tuple[Store | None, Response | None]:
        store = box.by_access_token(_bearer(request))
        if store is None:
            return None, _error(401, "Unauthorized", "The access token is invalid")
        if time.time() >= store.access_expires_at:
            store.count("expired_token")
            return None, _error(401, "Unauthorized", "The access token has expired")
        allowed, retry_after = store.bucket.take()
        if not allowed:
            store.count("rate_limited")
            headers = {**store.bucket.headers(), "Retry-After": str(math.ceil(retry_after))}
            return None, _error(429, "TooManyRequests", "Too many requests", headers)
        if store.faults.latency_s:
            await asyncio.sleep(store.faults.latency_s)
        if store.faults.statuses:
            status = store.faults.statuses.pop(0)
            store.count(f"fault_{status}")
            headers = store.bucket.headers()
            if status == 429:
                headers["Retry-After"] = "1"
            return None, _error(status, "error", f"sandbox fault {status}", headers)
        return store, None

    async def add_points(request: Request) -> Response:
        store, refusal = await authorized(request)
        if refusal is not None or store is None:
            return refusal or _error(401, "Unauthorized", "unauthorized")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "error", "body is not JSON", store.bucket.headers())
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
            return _error(422, "error", "alert.invalid_fields", store.bucket.headers(), fields)
        invalid = [c for c in body["customers"] if int(c) in store.faults.invalid_customers]
        if invalid:
            store.count("invalid_customers")
            return _error(
                422,
                "error",
                "alert.invalid_fields",
                store.bucket.headers(),
                {"customers": [f"حقل customers غير صالح: {c}" for c in invalid]},
            )
        if store.faults.drop_before_apply > 0:
            store.faults.drop_before_apply -= 1
            store.count("dropped_before_apply")
            return _Dropped()
        box.apply(store, body)
        store.calls.append(body)
        store.count("applied")
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
        store, refusal = await authorized(request)
        if refusal is not None or store is None:
            return refusal or _error(401, "Unauthorized", "unauthorized")
        raw_id = request.query_params.get("customer_id", "")
        if not raw_id.isdigit():
            return _error(
                422,
                "error",
                "alert.invalid_fields",
                store.bucket.headers(),
                {"customer_id": ["customer_id is required"]},
            )
        entries = store.history.get(int(raw_id), [])
        page = max(1, int(request.query_params.get("page", "1") or 1))
        per_page = 15
        chunk = entries[(page - 1) * per_page : page * per_page]
        total_pages = max(1, math.ceil(len(entries) / per_page))
        return JSONResponse(
            {
                "status": 200,
                "success": True,
                "data": chunk,
                "pagination": {
                    "count": len(chunk),
                    "total": len(entries),
                    "perPage": per_page,
                    "currentPage": page,
                    "totalPages": total_pages,
                    "links": {},
                },
            },
            200,
            store.bucket.headers(),
        )

    async def oauth_token(request: Request) -> Response:
        # Salla's token endpoint takes application/x-www-form-urlencoded.
        form = {
            k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()
        }
        if form.get("grant_type") != "refresh_token":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        presented = str(form.get("refresh_token", ""))
        for store in box.stores.values():
            if presented and secrets.compare_digest(presented, store.refresh_token):
                store.used_refresh_tokens.add(presented)
                store.access_token = secrets.token_urlsafe(24)
                store.refresh_token = secrets.token_urlsafe(24)
                store.access_expires_at = time.time() + 14 * 86400
                store.count("refreshed")
                return JSONResponse(
                    {
                        "access_token": store.access_token,
                        "token_type": "bearer",
                        "expires_in": 14 * 86400,
                        "refresh_token": store.refresh_token,
                        "scope": "customers.read_write offline_access",
                    }
                )
            if presented in store.used_refresh_tokens:
                # Salla revokes both tokens when a refresh token is used twice.
                store.access_token = secrets.token_urlsafe(24) + "-revoked"
                store.refresh_token = secrets.token_urlsafe(24) + "-revoked"
                store.count("refresh_reuse")
                return JSONResponse(
                    {"error": "invalid_grant", "error_description": "refresh token already used"},
                    400,
                )
        return JSONResponse(
            {"error": "invalid_grant", "error_description": "unknown refresh token"}, 400
        )

    async def control_add_store(request: Request) -> Response:
        doc = await request.json()
        store = box.add_store(int(doc["merchant"]), **doc)
        return JSONResponse(
            {
                "merchant": store.merchant,
                "access_token": store.access_token,
                "refresh_token": store.refresh_token,
                "expires": int(store.access_expires_at),
            },
            201,
        )

    async def control_store(request: Request) -> Response:
        store = box.stores.get(int(request.path_params["merchant"]))
        if store is None:
            return JSONResponse({"error": "no such store"}, 404)
        return JSONResponse(
            {
                "merchant": store.merchant,
                "balances": {str(k): v for k, v in store.balances.items()},
                "history": {str(k): v for k, v in store.history.items()},
                "calls": store.calls,
                "counters": store.counters,
            }
        )

    async def control_expire(request: Request) -> Response:
        store = box.stores.get(int(request.path_params["merchant"]))
        if store is None:
            return JSONResponse({"error": "no such store"}, 404)
        store.access_expires_at = 0
        return JSONResponse({"expired": True})

    async def control_faults(request: Request) -> Response:
        doc = await request.json()
        targets = (
            [box.stores[int(doc["merchant"])]] if doc.get("merchant") else list(box.stores.values())
        )
        for store in targets:
            store.faults = Faults(
                statuses=[int(s) for s in doc.get("statuses", [])],
                latency_s=float(doc.get("latency_s", 0)),
                drop_after_apply=int(doc.get("drop_after_apply", 0)),
                drop_before_apply=int(doc.get("drop_before_apply", 0)),
                invalid_customers={int(c) for c in doc.get("invalid_customers", [])},
            )
        return JSONResponse({"stores": [s.merchant for s in targets]})

    async def control_health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "stores": len(box.stores)})

    async def control_reset(request: Request) -> Response:
        box.stores.clear()
        return JSONResponse({"reset": True})

    app = Starlette(
        routes=[
            Route("/customers/loyalty/points", add_points, methods=["POST"]),
            Route("/customers/loyalty/points", points_history, methods=["GET"]),
            Route("/oauth2/token", oauth_token, methods=["POST"]),
            Route("/_sandbox/stores", control_add_store, methods=["POST"]),
            Route("/_sandbox/stores/{merchant:int}", control_store, methods=["GET"]),
            Route("/_sandbox/stores/{merchant:int}/expire", control_expire, methods=["POST"]),
            Route("/_sandbox/faults", control_faults, methods=["POST"]),
            Route("/_sandbox/reset", control_reset, methods=["POST"]),
            Route("/_sandbox/health", control_health, methods=["GET"]),
        ]
    )
    app.state.sandbox = box
    return app
